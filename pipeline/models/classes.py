"""The names of a model's output classes: shown in routes, saliency panels and tables, and
accepted wherever a class is asked for (`--target "tabby cat"` as well as `--target 281`).

Where names come from, first found: a file the user gives (`--class-names FILE`: a JSON list,
or one class per line; a class may list synonyms separated by ", "), the model's timm
pretrained config (`label_names` / `label_descriptions`: the demo models carry the synthetic
shapes), or timm's ImageNet metadata for a model whose head is an ImageNet subset (1000 classes:
"tabby, tabby cat", ...). A class is shown by its first synonym and found by any of them,
case-insensitively; a near miss gets a "did you mean".
"""
from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassNames:
    """Per class index its synonyms; the first is its name."""

    synonyms: tuple[tuple[str, ...], ...]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> ClassNames:
        """One entry per class; an entry may hold synonyms separated by ", "."""
        return cls(tuple(tuple(s.strip() for s in str(n).split(", ") if s.strip()) or (str(n),)
                         for n in names))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ClassNames:
        """A JSON list of names, or a text file with one class per line."""
        text = open(path, encoding="utf-8").read()
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = [line for line in text.splitlines() if line.strip()]
        if not isinstance(names, list) or not names:
            raise ValueError(f"{path}: expected a JSON list of class names or one name per line")
        return cls.from_names(names)

    def __len__(self) -> int:
        return len(self.synonyms)

    @property
    def names(self) -> list[str]:
        return [s[0] for s in self.synonyms]

    def name(self, index: int) -> str:
        """The name of class `index` ("class N" past the known names)."""
        return self.synonyms[index][0] if 0 <= index < len(self) else f"class {index}"

    def index(self, target: int | str, n_classes: int | None = None) -> int:
        """The class index of `target`: an index (or its text) or any synonym of a class.

        Raises ValueError naming the valid range, or the closest names ("did you mean").
        """
        n = len(self) if n_classes is None else n_classes
        if isinstance(target, int) or str(target).strip().lstrip("-").isdigit():
            index = int(target)
            if not 0 <= index < n:
                raise ValueError(f"unknown target class {index}: the model has {n} classes "
                                 f"(0..{n - 1})")
            return index
        wanted = str(target).strip().lower()
        for i, synonyms in enumerate(self.synonyms):
            if wanted in (s.lower() for s in synonyms):
                return i
        every = {s.lower(): s for synonyms in self.synonyms for s in synonyms}
        close = difflib.get_close_matches(wanted, list(every), n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(repr(every[c]) for c in close)}? " if close else "")
        raise ValueError(f"unknown target class {target!r}; {hint}give a class index "
                         f"0..{n - 1} or a name, e.g. {', '.join(repr(x) for x in self.names[:5])}")


def model_class_names(name: str) -> ClassNames | None:
    """The class names of timm model `name` from its pretrained config or timm's ImageNet
    metadata; None when neither knows them."""
    import timm.models
    from timm.data import ImageNetInfo, infer_imagenet_subset

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.label_descriptions or cfg.label_names:
        return ClassNames.from_names(list(cfg.label_descriptions or cfg.label_names))
    subset = infer_imagenet_subset(cfg.__dict__)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return ClassNames.from_names([info.index_to_description(i)
                                  for i in range(info.num_classes())])
