"""The one error every layer may raise for a mistake the user can fix.

Standard library only, so the launcher, which learns some of them from its ranks, can raise
it without an import cycle. The CLI turns it into one line on stderr and exit 2, nothing
written.

A message about a parameter names it as a field of its template, so that each caller words
it its own way: the library by the parameter's name (``world_sizes must be >= 1, got 0``),
the CLI by its flag (``--ws must be >= 1, got 0``). In a template, ``{world_sizes}`` is the
parameter, ``{world_sizes=0}`` the parameter set to the first value (``world_sizes=3``,
``--ws 3``), and ``{0}`` or ``{0!r}`` a value alone.
"""

from __future__ import annotations

import string
from typing import Any, Protocol


class Wording(Protocol):
    """How a message names a parameter, alone or set to a value."""

    def parameter(self, name: str) -> str: ...

    def setting(self, name: str, value: Any) -> str: ...


class ParameterNames:
    """The library's wording: a parameter by its Python name."""

    def parameter(self, name: str) -> str:
        return name

    def setting(self, name: str, value: Any) -> str:
        return f"no {name}" if value is None else f"{name}={value!r}"


class _TemplateFormatter(string.Formatter):
    def __init__(self, wording: Wording) -> None:
        self.wording = wording

    def get_field(self, field_name: str, args, kwargs):
        if field_name.isdigit():
            return args[int(field_name)], field_name
        name, is_setting, index = field_name.partition("=")
        if is_setting:
            return self.wording.setting(name, args[int(index)]), field_name
        return self.wording.parameter(name), field_name


class BadInput(ValueError):
    """A mistake in what the user asked for, or a stack that cannot run anything (bitsandbytes
    without its native library): one line, exit 2, no report written.

    ``BadInput(message)`` is worded once for every caller; ``BadInput.about(template,
    *values)`` names parameters, worded by each caller (see the module's docstring).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # A plain message holds no field: its braces (a path, a repr) are text.
        self.template = message.replace("{", "{{").replace("}", "}}")
        self.values: tuple[Any, ...] = ()

    @classmethod
    def about(cls, template: str, *values: Any) -> BadInput:
        made = cls(_TemplateFormatter(ParameterNames()).format(template, *values))
        made.template, made.values = template, values
        return made

    @property
    def parameters(self) -> list[str]:
        """The parameters the message names, in order."""
        fields = (field for _, field, _, _ in string.Formatter().parse(self.template) if field)
        return [field.partition("=")[0] for field in fields if not field.isdigit()]

    def worded(self, wording: Wording) -> str:
        """The message with each parameter named as ``wording`` names it."""
        return _TemplateFormatter(wording).format(self.template, *self.values)
