"""The ``puzzle`` service: IP puzzles, a client proxy and a server firewall (see ``service``)."""

from vtl.services.puzzle.service import Puzzle, PuzzleOptions

__all__ = ["Puzzle", "PuzzleOptions"]
