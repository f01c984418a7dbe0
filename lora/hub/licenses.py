"""The license identifiers the Hugging Face Hub accepts in a model card's ``license:`` field.

Why a list here: the Hub rejects a card whose license is not one of its identifiers (a free
text such as "MIT License" is refused at upload, after everything was staged and the token
used). Checking against the same list before anything is staged turns that into a one-line
error naming the flag. The list is the Hub's documented table of identifiers ("Licenses" in
the Hub documentation); ``other`` is the escape hatch for any other license.
"""
from __future__ import annotations

import difflib

HUB_LICENSES: frozenset[str] = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m",
    "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0",
    "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0",
    "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0",
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0",
    "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1", "agpl-3.0", "gfdl", "gpl", "gpl-2.0",
    "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by",
    "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib",
    "pddl", "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1", "llama3.2",
    "llama3.3", "gemma", "unknown", "other",
})

#: Shown in errors: the identifiers an SD1.5 LoRA usually carries.
COMMON_FOR_SD_LORAS = ("creativeml-openrail-m", "openrail++", "cc-by-nc-4.0", "mit", "apache-2.0", "other")


def check_license(value: str, *, flag: str = "--license") -> str:
    """``value`` when the Hub accepts it as a license identifier, else ValueError (one line)."""
    if value in HUB_LICENSES:
        return value
    lowered = value.strip().lower()
    if lowered in HUB_LICENSES:
        hint = f"did you mean {lowered!r}?"
    else:
        close = difflib.get_close_matches(lowered.replace(" license", "").replace(" ", "-"),
                                          sorted(HUB_LICENSES), n=3, cutoff=0.6)
        hint = ("did you mean " + " or ".join(repr(c) for c in close) + "?") if close else \
            "e.g. " + ", ".join(COMMON_FOR_SD_LORAS)
    raise ValueError(f"{flag}: {value!r} is not a license identifier the Hub accepts; {hint} "
                     "(use 'other' for any other license)")
