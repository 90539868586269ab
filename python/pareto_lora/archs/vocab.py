"""Which vocabulary ids are image tokens, read from the model's own config (never from the user).

Chameleon/Anole and Emu3 put discrete image codes into the text vocabulary and record them in
``config.vocabulary_map`` (token name -> id); transformers builds its
``*ImageVocabularyMapping`` from the same map. We read the map directly rather than the
mapping object so that a spec can be built from a config alone, and we apply the same name
rules as transformers:

* Chameleon: code tokens are named ``IMGIMG<letters>Z`` (``ChameleonImageVocabularyMapping``).
  Begin/end of image are ``<racm3:break>`` / ``<eoss>`` (the Chameleon processor's defaults).
* Emu3: code tokens are named ``<|visual token 000123|>``; every image row ends with
  ``<|extra_200|>`` (end of line) and the image with ``<|extra_201|>`` (end of frame), wrapped in
  ``<|image start|>`` ... ``<|image end|>`` with ``<|image token|>`` after the size prefix
  (``Emu3Processor``).

Begin/end-of-image and row/frame markers are counted as image tokens: they are what the model
emits while drawing an image, and their count is fixed by the image size, so they belong to the
image objective rather than the text one (two or a few per image: the choice barely moves the
text loss). ``<image>`` is the *input* placeholder that the model replaces by image features;
it is never a target and is reported separately.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["chameleon_image_ids", "emu3_image_ids", "placeholder_id"]

CHAMELEON_CODE_PREFIX = "IMGIMG"
CHAMELEON_SPECIALS = ("<racm3:break>", "<eoss>")  # begin / end of image
EMU3_CODE_PREFIX = "<|visual token"
EMU3_SPECIALS = ("<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>", "<|extra_201|>")
PLACEHOLDER = "<image>"


def _require_map(vocabulary_map: Mapping[str, int] | None, arch: str) -> Mapping[str, int]:
    if not vocabulary_map:
        raise ValueError(
            f"{arch}: config.vocabulary_map is empty, so the image-token ids are unknown; a real checkpoint's "
            "config carries it (tokenizer vocabulary). Build the config with vocabulary_map=... or pass "
            "ArchOverrides(image_token_ids=...)"
        )
    return vocabulary_map


def _ids(vocabulary_map: Mapping[str, int], prefix: str, specials: tuple[str, ...]) -> tuple[int, ...]:
    codes = {int(v) for k, v in vocabulary_map.items() if k.startswith(prefix)}
    extra = {int(vocabulary_map[s]) for s in specials if s in vocabulary_map}
    return tuple(sorted(codes | extra))


def chameleon_image_ids(vocabulary_map: Mapping[str, int] | None) -> tuple[int, ...]:
    """Sorted ids of Chameleon/Anole image tokens: the ``IMGIMG*`` codes plus begin/end of image."""
    vm = _require_map(vocabulary_map, "chameleon")
    ids = _ids(vm, CHAMELEON_CODE_PREFIX, CHAMELEON_SPECIALS)
    if not any(k.startswith(CHAMELEON_CODE_PREFIX) for k in vm):
        raise ValueError("chameleon: config.vocabulary_map has no IMGIMG* image-code tokens")
    return ids


def emu3_image_ids(vocabulary_map: Mapping[str, int] | None) -> tuple[int, ...]:
    """Sorted ids of Emu3 image tokens: ``<|visual token ...|>`` codes plus the image markers."""
    vm = _require_map(vocabulary_map, "emu3")
    if not any(k.startswith(EMU3_CODE_PREFIX) for k in vm):
        raise ValueError("emu3: config.vocabulary_map has no '<|visual token ...|>' image-code tokens")
    return _ids(vm, EMU3_CODE_PREFIX, EMU3_SPECIALS)


def placeholder_id(vocabulary_map: Mapping[str, int] | None) -> int | None:
    """Id of the ``<image>`` input placeholder (None when the map has none)."""
    if not vocabulary_map or PLACEHOLDER not in vocabulary_map:
        return None
    return int(vocabulary_map[PLACEHOLDER])
