"""The ``langsam`` backend: GroundingDINO (text -> boxes) + SAM (boxes -> masks), as in the paper.

Both models come from ``transformers`` (the ``[priors]`` extra) and are loaded only from local
directories - nothing is downloaded at run time. For every text prompt the detector runs once
over the batch of tiles; boxes scoring above ``box_threshold`` are kept (as in LangSAM, the
``text_threshold`` only decides which words of the prompt a box is attributed to, and since each
prompt has its own detector pass every kept box belongs to it). SAM then turns all boxes of a
tile into masks in one decoder call on the tile's image embedding (computed once per tile, for
all prompts); the union of a prompt's masks is that prompt's mask, and the fusion rules
(``ssageo.priors.fusion``) turn the prompt masks into the label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import ssageo  # noqa: F401  (CPU fallbacks for torchvision ops before transformers imports it)
from ssageo.config import ConfigError
from ssageo.device import resolve_device
from ssageo.io import DataError, read_image
from ssageo.priors.fusion import compile_classes, fuse
from ssageo.priors.run import Tile

# What the paper used, and so what the error messages tell a user to download.
DETECTOR_ID = "IDEA-Research/grounding-dino-base"
SEGMENTER_ID = "facebook/sam-vit-huge"
_SAM_BOXES_PER_CALL = 64  # bounds the mask decoder's memory on tiles with many detections


def _weights_dir(path: str | Path | None, what: str, model_id: str, flag: str, key: str) -> Path:
    """The checked local weights directory; a clear error saying what to fetch otherwise."""
    how = (
        f"download {what} once on a machine with internet, e.g. "
        f"`hf download {model_id} --local-dir weights/{model_id.split('/')[1]}`, "
        f"and pass that directory with {flag} (or set {key} in the priors YAML)"
    )
    if path is None or str(path) == "":
        raise ConfigError(f"no {what} weights given: {how}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: {what} weights directory not found - {how}")
    if not (path / "config.json").is_file():
        raise DataError(
            f"{path}: no config.json, so this is not a transformers {what} directory - {how}"
        )
    return path


class LangSamBackend:
    """Prior labels from GroundingDINO + SAM loaded from local ``transformers`` directories.

    ``prompts``: text prompts; ``classes``: ``{class name: fusion rule over prompts}``
    (one class -> 0/255 labels, several -> index map); thresholds as in GroundingDINO.
    """

    def __init__(
        self,
        detector: str | Path | None,
        segmenter: str | Path | None,
        prompts: Sequence[str],
        classes: Mapping[str, str],
        box_threshold: float = 0.24,
        text_threshold: float = 0.6,
        device: str = "auto",
        batch_size: int = 4,
    ) -> None:
        detector_dir = _weights_dir(
            detector, "GroundingDINO", DETECTOR_ID, "--detector", "priors.detector"
        )
        segmenter_dir = _weights_dir(
            segmenter, "SAM", SEGMENTER_ID, "--segmenter", "priors.segmenter"
        )
        if not prompts:
            raise ConfigError("priors.prompts is empty: give at least one text prompt")
        self.prompts = [str(p) for p in prompts]
        self.classes = compile_classes(classes, self.prompts)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device, "priors device")
        try:
            import torch
            from transformers import (
                GroundingDinoForObjectDetection,
                GroundingDinoProcessor,
                SamModel,
                SamProcessor,
            )
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise ConfigError(
                f"the langsam backend needs transformers ({exc}): "
                'pip install -c constraints.txt -e ".[priors]"'
            ) from None
        self._torch = torch
        hf_logging.disable_progress_bar()  # loading is quick; the run's progress bar is ours
        self.detector = GroundingDinoForObjectDetection.from_pretrained(
            detector_dir, local_files_only=True
        ).to(self.device).eval()
        self.detector_processor = GroundingDinoProcessor.from_pretrained(
            detector_dir, local_files_only=True
        )
        self.segmenter = SamModel.from_pretrained(segmenter_dir, local_files_only=True)
        self.segmenter = self.segmenter.to(self.device).eval()
        self.segmenter_processor = SamProcessor.from_pretrained(
            segmenter_dir, local_files_only=True
        )

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> LangSamBackend:
        """Build from the ``priors`` section of a config (see ``configs/priors-langsam.yaml``)."""
        keys = ("detector", "segmenter", "prompts", "classes", "box_threshold",
                "text_threshold", "device", "batch_size")
        missing = [k for k in keys if k not in section]
        if missing:
            raise ConfigError(f"priors section lacks {', '.join(missing)}")
        return cls(**{k: section[k] for k in keys})

    def detect(self, images: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Boxes per prompt per image: ``[prompt][image] -> (N, 4) x0, y0, x1, y1`` pixels."""
        torch = self._torch
        sizes = [image.shape[:2] for image in images]
        per_prompt = []
        for prompt in self.prompts:
            # a list of candidate labels is turned into GroundingDINO's "prompt." text
            inputs = self.detector_processor(
                images=list(images), text=[[prompt]] * len(images), return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                outputs = self.detector(**inputs)
            results = self.detector_processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=sizes,
            )
            per_prompt.append([r["boxes"].float().cpu().numpy() for r in results])
        return per_prompt

    def segment(self, image: np.ndarray, embedding: Any, boxes: np.ndarray) -> np.ndarray:
        """SAM masks of ``boxes`` (N, 4) on one image: (N, H, W) bool."""
        torch = self._torch
        height, width = image.shape[:2]
        masks = [np.zeros((0, height, width), dtype=bool)]
        for start in range(0, len(boxes), _SAM_BOXES_PER_CALL):
            chunk = boxes[start : start + _SAM_BOXES_PER_CALL]
            inputs = self.segmenter_processor(
                images=image, input_boxes=[chunk.tolist()], return_tensors="pt"
            )
            with torch.inference_mode():
                out = self.segmenter(
                    image_embeddings=embedding,
                    input_boxes=inputs["input_boxes"].to(self.device, embedding.dtype),
                    multimask_output=False,
                )
            full = self.segmenter_processor.image_processor.post_process_masks(
                out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0]  # (N, 1, H, W) bool
            masks.append(full[:, 0].numpy().astype(bool))
        return np.concatenate(masks)

    def prompt_masks(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per image, ``{prompt: (H, W) bool}`` - the union of the prompt's SAM masks."""
        torch = self._torch
        boxes = self.detect(images)
        pixels = self.segmenter_processor(images=list(images), return_tensors="pt")
        with torch.inference_mode():
            embeddings = self.segmenter.get_image_embeddings(
                pixels["pixel_values"].to(self.device)
            )
        out = []
        for i, image in enumerate(images):
            counts = [len(boxes[p][i]) for p in range(len(self.prompts))]
            all_boxes = np.concatenate([boxes[p][i] for p in range(len(self.prompts))])
            masks = self.segment(image, embeddings[i : i + 1], all_boxes)
            bounds = np.cumsum([0, *counts])
            out.append({
                prompt: masks[bounds[p] : bounds[p + 1]].any(axis=0)
                if counts[p] else np.zeros(image.shape[:2], dtype=bool)
                for p, prompt in enumerate(self.prompts)
            })
        return out

    def predict(self, tiles: Sequence[Tile]) -> list[np.ndarray]:
        """Labels for a batch of tiles: (H, W) uint8 each, the tile's own size."""
        images = [np.array(read_image(tile.path)) for tile in tiles]  # writable for torch
        return [fuse(masks, self.classes) for masks in self.prompt_masks(images)]

    def statistics(self) -> dict[str, float]:
        return {}
