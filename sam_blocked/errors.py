"""Refusals that name the setting to change, so that each front end can say it in its own words.

The library speaks in settings, the edges in flags: a message names `max_pixels`, the CLI
says `--max-pixels`, the demo names its own cap. A message is written once, as a template
with each setting it names in braces, and rendered by whoever shows it:

    error = SettingError("1,000 pixels is above {max_pixels} 500: raise {max_pixels}", "max_pixels")
    str(error)                                  # '... above max_pixels 500: raise max_pixels'
    error.spelled({"max_pixels": "--max-pixels"})  # '... above --max-pixels 500: raise --max-pixels'

Only the settings listed are placeholders: any other brace in the text stays as it is.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Optional

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SettingError(ValueError):
    """A value refused because of a setting; says which, for each front end to spell.

    Args:
        template: the message; each setting it names is written `{name}`.
        settings: the names of those settings (the library's: max_pixels, tile, formats, ...).
    """

    def __init__(self, template: str, *settings: str) -> None:
        super().__init__(template, *settings)  # args rebuild it when pickled (a Ray worker's error)
        self.template, self.settings = template, tuple(settings)

    def spelled(self, names: Optional[Mapping[str, str]] = None) -> str:
        """The message with each setting written as `names` has it (default: the setting's own name)."""
        names = names or {}

        def spell(match: re.Match) -> str:
            name = match[1]
            return names.get(name, name) if name in self.settings else match[0]

        return _PLACEHOLDER.sub(spell, self.template)

    def __str__(self) -> str:
        return self.spelled()


class InputError(SettingError):
    """A problem with one image or its prompts: that image fails, the run goes on."""


def spell(error: BaseException, names: Optional[Mapping[str, str]] = None) -> str:
    """`error`'s message, its settings spelled as `names` has them when it names any."""
    return error.spelled(names) if isinstance(error, SettingError) else str(error)


class FlagNames(Mapping[str, str]):
    """Every setting spelled as a command-line flag: max_pixels -> --max-pixels.

    Args:
        renamed: settings whose flag is not their own name, e.g. {"formats": "format"}.
    """

    def __init__(self, renamed: Optional[Mapping[str, str]] = None) -> None:
        self.renamed = dict(renamed or {})

    def __getitem__(self, setting: str) -> str:
        return "--" + self.renamed.get(setting, setting).replace("_", "-")

    def __iter__(self) -> Iterator[str]:
        return iter(self.renamed)  # any setting has a flag; only the renamed ones are listed

    def __len__(self) -> int:
        return len(self.renamed)
