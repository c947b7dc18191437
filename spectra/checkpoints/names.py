"""Matching tensor names across two checkpoints whose model classes differ in prefix.

``GPT2Model`` saves ``h.0.attn.c_attn.weight`` where ``GPT2LMHeadModel`` saves
``transformer.h.0.attn.c_attn.weight``; ``BertModel`` saves ``encoder.…`` where
``BertForSequenceClassification`` saves ``bert.encoder.…``. Names are paired when one
equals the other or ends with it at a dot boundary; a name with more than one
candidate is ambiguous and reported, never guessed.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class NameMatch:
    """Result of matching two name lists: pairs, names on one side only, ambiguities."""

    pairs: dict[str, str] = field(default_factory=dict)  # base name -> tuned name
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # name -> candidates


def _suffixes(name: str) -> Iterable[str]:
    """Proper dot-suffixes of ``name``: ``a.b.c`` → ``b.c``, ``c``."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[i:])


def match_names(base_names: Iterable[str], tuned_names: Iterable[str]) -> NameMatch:
    """Pair names exactly, else by dot-suffix in either direction.

    Parameters
    ----------
    base_names, tuned_names : iterable of str
        Tensor names of the two checkpoints.

    Returns
    -------
    NameMatch
        ``pairs`` maps a base name to its tuned name. A tuned name claimed by two base
        names, or a base name with two candidates, lands in ``ambiguous`` instead.
    """
    base_names, tuned_names = list(base_names), list(tuned_names)
    tuned_set = set(tuned_names)
    by_suffix: dict[str, list[str]] = defaultdict(list)  # suffix -> tuned names ending with it
    for t in tuned_names:
        for s in _suffixes(t):
            by_suffix[s].append(t)

    result = NameMatch()
    claimed: dict[str, list[str]] = defaultdict(list)  # tuned name -> base names that chose it
    for b in base_names:
        if b in tuned_set:
            claimed[b].append(b)
            continue
        candidates = list(by_suffix.get(b, ()))  # tuned name is longer: prefix added on the tuned side
        candidates += [s for s in _suffixes(b) if s in tuned_set]  # tuned name is shorter
        candidates = list(dict.fromkeys(candidates))
        if len(candidates) == 1:
            claimed[candidates[0]].append(b)
        elif len(candidates) > 1:
            result.ambiguous[b] = candidates
        else:
            result.only_in_base.append(b)
    for t, bs in claimed.items():
        exact = [b for b in bs if b == t]
        if exact or len(bs) == 1:  # an exact match wins over suffix matches
            result.pairs[exact[0] if exact else bs[0]] = t
            result.only_in_base.extend(b for b in bs if b not in result.pairs)
        else:
            result.ambiguous[t] = bs
    paired_tuned = set(result.pairs.values())
    result.only_in_tuned = [t for t in tuned_names if t not in paired_tuned and t not in result.ambiguous]
    return result


def compile_name_filter(pattern: str | None, *, option: str):
    """A predicate from a glob (``*.q_proj``) or a regular expression (``re:…``); None keeps all."""
    from spectra.errors import ConfigError

    if pattern is None:
        return None
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise ConfigError(f"{option}: {pattern[3:]!r} is not a valid regular expression ({err}).") from err
        return lambda name: regex.search(name) is not None
    if not any(c in pattern for c in "*?["):
        return lambda name: pattern in name  # a plain word: any name containing it
    # Split projections are named with brackets (c_attn[q]): a bracket that does not match as a glob
    # character class is also tried literally, so the names spectra prints can be pasted as patterns.
    literal = pattern.replace("[", "[[]")
    return lambda name: fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, literal)


def natural_key(name: str) -> list:
    """Sort key of a module name in natural order, its digit runs read as numbers: layers.2 before layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def is_bare_parameter(tensor: str | None, *, expert: int | None = None) -> bool:
    """Whether a matrix stored as ``tensor`` is a parameter of its own, no layer's weight: a ViT's position table
    (``embeddings.position_embeddings``, stored (1, N, d), measured N × d), BLIP-2's ``query_tokens``, Gemma 3's
    ``mm_input_projection_weight``. PEFT puts a LoRA on a module's weight (Linear, Embedding, Conv: a ``….weight``,
    GPT-2's ``wpe.weight`` included) or, through ``target_parameters``, on an expert tensor (one ``expert``'s slice,
    or a name under ``.experts.``), and on nothing else. An unknown ``tensor`` (an analysis written before rows named
    it) is taken as a weight. The one rule of recommend, extract's selection and its left-out advice."""
    return (isinstance(tensor, str) and not tensor.endswith(".weight") and expert is None
            and ".experts." not in f".{tensor}.")


def bare_parameters_why(count: int) -> str:
    """Why ``count`` matrices that :func:`is_bare_parameter` takes get no LoRA, in the words every refusal and
    left-out note about them shares: "a parameter of its own, no layer's weight, which PEFT cannot adapt (…)"."""
    what = "a parameter of its own" if count == 1 else "parameters of their own"
    return (f"{what}, no layer's weight, which PEFT cannot adapt (it puts a LoRA on a module's weight, or through "
            "target_parameters on an expert tensor)")

