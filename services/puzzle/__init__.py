"""The ``puzzle`` service (IP puzzles): its wire formats and cryptography so far."""
