"""Tiny randomly initialised GroundingDINO and SAM, saved like real ``transformers`` weights.

They exercise the whole ``langsam`` path (processors, detector, SAM, fusion, writing) with
nothing to download - for the tests, the per-tile timing benchmark, and a smoke test of an
installation. Their masks are meaningless: the weights are random.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import ssageo  # noqa: F401  (CPU fallbacks for torchvision ops before transformers imports it)

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]


def _staging(target: Path) -> Path:
    """An empty dot-named folder beside ``target``: a model is written there, then renamed into
    place, so an interrupted write never leaves a half model at ``target``."""
    if target.exists():
        raise FileExistsError(f"{target}: already exists; remove it or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def save_tiny_langsam(
    folder: Path, prompts: Sequence[str], image_size: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``folder/detector`` and ``folder/segmenter``; returns the two directories.

    The detector's BERT tokenizer knows exactly the words of ``prompts``; both models work on
    ``image_size`` pixel inputs (tiles of other sizes are resized by the processors).
    """
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
        SwinConfig,
    )

    folder = Path(folder)
    words = sorted({w for p in prompts for w in p.lower().split()})
    vocab = {token: i for i, token in enumerate(_SPECIAL + words)}
    torch.manual_seed(seed)

    detector_config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=image_size, patch_size=4, embed_dim=8, depths=[1, 1, 1],
            num_heads=[1, 1, 1], window_size=2, out_indices=[2, 3],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
            intermediate_size=32, max_position_embeddings=64,
        ),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=1, num_queries=10,
        num_feature_levels=2, encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )
    detector_dir = folder / "detector"
    staging = _staging(detector_dir)
    GroundingDinoForObjectDetection(detector_config).save_pretrained(staging)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": image_size, "longest_edge": image_size}
        ),
        tokenizer=BertTokenizerFast(vocab=vocab),
    ).save_pretrained(staging)
    staging.replace(detector_dir)

    patch = 8
    segmenter_config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=1,
            image_size=image_size, patch_size=patch, mlp_dim=32, global_attn_indexes=[0],
            window_size=0, num_pos_feats=8,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=image_size, patch_size=patch, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=1, mlp_dim=16,
            iou_head_hidden_dim=16,
        ),
    )
    segmenter_dir = folder / "segmenter"
    staging = _staging(segmenter_dir)
    SamModel(segmenter_config).save_pretrained(staging)
    mask_size = image_size // 4
    SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": mask_size},
            mask_pad_size={"height": mask_size, "width": mask_size},
        )
    ).save_pretrained(staging)
    staging.replace(segmenter_dir)
    return detector_dir, segmenter_dir
