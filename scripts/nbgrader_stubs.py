"""The one thing kdbook changes in nbgrader's student edition: stubs that keep it runnable.

nbgrader replaces a solution region by ``# YOUR CODE HERE`` and ``raise NotImplementedError()``. Inside a
function body that is right: calling the function raises, and its check says "not done yet". At the top
level of a cell the ``raise`` would stop "Run all" there, so this subclass leaves the comment alone. Both
``scripts/editions.py`` and the ``nbgrader_config.py`` it writes for a course use this class, so a student
edition made by either is the same.
"""

from __future__ import annotations

from typing import Any

from nbgrader.preprocessors import ClearSolutions

TOP_LEVEL_STUB = "# YOUR CODE HERE"


class RunnableClearSolutions(ClearSolutions):
    """nbgrader's ClearSolutions, with a comment alone (no ``raise``) for a region at the top level."""

    def _replace_solution_region(self, cell: Any, language: str) -> bool:
        if cell.cell_type != "code":
            return super()._replace_solution_region(cell, language)
        kept, inside, replaced = [], False, False
        for line in cell.source.split("\n"):
            if self.begin_solution_delimeter in line:
                indent = line[: len(line) - len(line.lstrip())]
                stub = self.code_stub[language] if indent else TOP_LEVEL_STUB
                kept += [indent + stub_line for stub_line in stub.split("\n")]
                inside = replaced = True
            elif self.end_solution_delimeter in line:
                inside = False
            elif not inside:
                kept.append(line)
        cell.source = "\n".join(kept)
        return replaced
