"""LLaVA-v1-era [SEG] checkpoints (LISA, GLaMM): their folders, their processor, and the GroundingModel they become.

Such a folder is a transformers-4.31 ``LlavaLlamaForCausalLM`` subclass saved by its project's merge script:
``config.json`` (a LlamaConfig plus ``mm_*`` fields, ``out_dim``), ``pytorch_model*.bin`` (bf16), the slow
tokenizer's files. The CLIP tower is not inside (users hold it separately); SAM ViT-H and the [SEG] projection
(``text_hidden_fcs.0``: Linear-ReLU-Linear-Dropout) are. The family modules (lisa.py, glamm.py) give the
differences as a ``LlavaV1Layout``.

In groundseg the VLM is transformers' own ``LlavaForConditionalGeneration`` with:
- the language model and lm_head of the folder, the CLIP tower of the CLIP folder, the folder's projector
  (one ``Linear`` for LISA; Linear-GELU-Linear for GLaMM);
- image tokens: the project marks the image by one id past the vocabulary (``vocab_size``), as LISA marks it by
  -200: the ids the model can write are exactly the checkpoint's, and the image's slots never collide with text;
- the [SEG] state is the last layer (after the final norm) at the token before ``[SEG]`` (``seg_state="before"``).

Processor (``LlavaV1Processor``), exactly as LISA's code with transformers 4.31:
- CLIP input: shortest side to ``s`` with PIL bicubic (long side truncated), centre crop ``s x s``, x/255, CLIP
  mean/std -> ``[3, s, s]`` float32;
- text: ``<s>`` + the template split at ``<image>``, each piece tokenised by the 4.31 slow tokenizer
  (slow_llama_tokenizer.py), the image slot expanded to ``num_image_tokens`` ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from grounding.config import GroundingConfig
from grounding.errors import CheckpointError, PromptError, QuestionError
from grounding.families.llava_v1_weights import iter_tensors, load_mapped, weight_files, weight_names
from grounding.families.slow_llama_tokenizer import SlowLlamaTokenizer
from grounding.processor import IGNORE_INDEX, EncodedText, GroundingProcessor

IMAGE_MARK = "<image>"
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class LlavaV1Layout:
    """What differs between LISA and GLaMM folders.

    sam_prefix:   where SAM's weights are in the folder (``model.visual_model.`` / ``model.grounding_encoder.``).
    projector:    ``"linear"`` (one Linear) or ``"mlp2x_gelu"`` (Linear-GELU-Linear).
    image_text:   how the image sits in the user's turn, ``{image}`` standing for ``<im_start><image><im_end>``.
    required_tokens: added tokens the folder must have.
    legacy:       the tokenisation its numbers come from (None: what ``tokenizer_config.json`` says).
    ignored_prefixes: weights of parts groundseg does not run (GLaMM's region encoder).
    """
    family: str
    architecture: str
    sam_prefix: str
    projector: str
    image_text: str
    required_tokens: tuple[str, ...] = ("[SEG]", "<im_start>", "<im_end>")
    legacy: bool | None = None
    ignored_prefixes: tuple[str, ...] = ()


# ---- the folder ------------------------------------------------------------------------------------------------
def check_folder(folder: Path, layout: LlavaV1Layout, what: str) -> dict:
    """The folder's ``config.json`` if it is a ``layout`` checkpoint; one CheckpointError line naming the path
    and what is missing otherwise."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no {what} checkpoint at {folder}: {config_file} does not exist")
    config = json.loads(config_file.read_text())
    archs = config.get("architectures") or []
    if layout.architecture not in archs:
        raise CheckpointError(f"{config_file} describes {archs or 'no architecture'}, not a {what} checkpoint "
                              f"({layout.architecture})")
    for name in ("tokenizer.model", "added_tokens.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{what} checkpoint {folder} lacks {name} (the slow tokenizer's files)")
    added = json.loads((folder / "added_tokens.json").read_text())
    missing = [t for t in layout.required_tokens if t not in added]
    if missing:
        raise CheckpointError(f"{folder / 'added_tokens.json'}: unknown token layout, {', '.join(missing)} missing "
                              f"(has {', '.join(sorted(added)) or 'nothing'})")
    names = weight_names(folder)
    for prefix, part in ((layout.sam_prefix, "SAM"), ("model.text_hidden_fcs.0.", "the [SEG] projection"),
                         ("model.mm_projector.", "the projector"), ("lm_head.", "the language model head")):
        if not any(n.startswith(prefix) for n in names):
            raise CheckpointError(f"{what} checkpoint {folder} has no {part} weights ({prefix}*)")
    return config


def check_clip_folder(folder: Path, config: dict):
    """The ``CLIPVisionConfig`` of a CLIP folder that fits the checkpoint's ``mm_hidden_size``."""
    from transformers import CLIPVisionConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no CLIP vision tower at {folder}: {folder / 'config.json'} does not exist "
                              "(e.g. openai/clip-vit-large-patch14; see weights/README.md)")
    vision = CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)
    want = config.get("mm_hidden_size")
    if want is not None and vision.hidden_size != want:
        raise CheckpointError(f"the CLIP tower at {folder} has width {vision.hidden_size}, the checkpoint's projector "
                              f"reads {want}: wrong CLIP folder")
    return vision


def sam_spec_from_weights(names_shapes: dict[str, tuple[int, ...]], prefix: str) -> dict:
    """The segment-anything hyper-parameters of the SAM stored under ``prefix``, read from its tensor shapes
    (ViT-H gives the ``vit_h`` preset's numbers). The decoder's head count is not in the weights: SAM's 8."""
    def shape(name: str) -> tuple[int, ...]:
        if prefix + name not in names_shapes:
            raise CheckpointError(f"SAM weights lack {prefix + name}")
        return names_shapes[prefix + name]

    def count(stem: str) -> int:
        return len({k[len(prefix + stem):].split(".")[0] for k in names_shapes if k.startswith(prefix + stem)})

    embed, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    depth = count("image_encoder.blocks.")
    rel = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    global_blocks = [i for i, r in enumerate(rel) if r[0] == 2 * grid - 1]
    windowed = [r[0] for r in rel if r[0] != 2 * grid - 1]
    return {
        "image_size": grid * patch, "patch_size": patch, "window_size": (windowed[0] + 1) // 2 if windowed else 14,
        "prompt_dim": shape("image_encoder.neck.0.weight")[0], "encoder_embed_dim": embed, "encoder_depth": depth,
        "encoder_num_heads": embed // rel[0][1], "encoder_global_attn_indexes": global_blocks,
        "decoder_depth": count("mask_decoder.transformer.layers."),
        "decoder_mlp_dim": shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0], "decoder_num_heads": 8,
        "iou_head_hidden_dim": shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
        "mask_in_chans": shape("prompt_encoder.mask_downscaling.3.weight")[0],
    }


# ---- the model ---------------------------------------------------------------------------------------------------
class LinearProjector(nn.Module):
    """LLaVA-v1's projector: one Linear from the CLIP width to the language model's."""

    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class ImageSlotEmbedding(nn.Embedding):
    """The language model's token embedding that also accepts the image slot id (one past the vocabulary): its
    rows are placeholders that the VLM overwrites with the image's features."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids.clamp(max=self.num_embeddings - 1))


def build_llava_v1(config: GroundingConfig, layout: LlavaV1Layout, tokenizer: SlowLlamaTokenizer,
                   dtype: torch.dtype = torch.float32):
    """The GroundingModel of a LISA/GLaMM folder (``config.vlm_path``) and a CLIP folder (``config.vision_path``)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from grounding.model import GroundingModel
    from segdecoder.sam import SamBackend

    folder, clip = Path(config.vlm_path), Path(config.vision_path or "")
    if not config.vision_path:
        raise CheckpointError(f"groundseg.json names no CLIP folder (vision_path); {layout.family} checkpoints hold "
                              "no vision tower: convert again with --clip DIR")
    raw = check_folder(folder, layout, layout.family)
    vision = check_clip_folder(clip, raw)
    known = LlamaConfig().to_dict()
    text = LlamaConfig(**{k: v for k, v in raw.items() if k in known and k not in ("architectures", "model_type")})
    text.tie_word_embeddings = False
    select = raw.get("mm_vision_select_layer", -2)
    llava = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), vision_feature_layer=select,
                        vision_feature_select_strategy="default", image_token_id=text.vocab_size,
                        projector_hidden_act="gelu", tie_word_embeddings=False)
    shapes = _tensor_shapes(folder)
    spec = sam_spec_from_weights(shapes, layout.sam_prefix)
    out_dim = shapes["model.text_hidden_fcs.0.2.weight"][0]
    if out_dim != spec["prompt_dim"]:
        raise CheckpointError(f"{folder}: the [SEG] projection gives {out_dim} values, SAM takes {spec['prompt_dim']}")
    with init_empty_weights(include_buffers=False):
        vlm = LlavaForConditionalGeneration(llava)
        lm = vlm.model.language_model
        lm.embed_tokens = ImageSlotEmbedding(text.vocab_size, text.hidden_size, text.pad_token_id)
        if layout.projector == "linear":
            vlm.model.multi_modal_projector = LinearProjector(vision.hidden_size, text.hidden_size)
        decoder = SamBackend.from_spec(spec, preset=_preset_name(spec))
        model = GroundingModel(config, vlm, decoder, tokenizer.convert_tokens_to_ids("[SEG]"), (-1, -1))
    own = model.state_dict()
    tower = "vlm.model.vision_tower." + ("vision_model." if any(k.startswith("vlm.model.vision_tower.vision_model.")
                                                              for k in own) else "")
    load_mapped(model, [(folder, _checkpoint_names(layout)), (clip, _clip_names(tower))], dtype)
    return model.to(dtype)


def _preset_name(spec: dict) -> str:
    from segdecoder.build import SAM_PRESETS
    for name, preset in SAM_PRESETS.items():
        if all(preset.get(k) == v for k, v in spec.items()):
            return name
    return "custom"


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape without reading the values (safetensors headers; memory-mapped .bin files)."""
    shapes = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        else:
            for name, tensor in iter_tensors(path):
                shapes[name] = tuple(tensor.shape)
    return shapes


def _checkpoint_names(layout: LlavaV1Layout) -> Callable[[str], str | None]:
    projector = {"linear": {"model.mm_projector.weight": "linear.weight", "model.mm_projector.bias": "linear.bias"},
                 "mlp2x_gelu": {"model.mm_projector.0.weight": "linear_1.weight", "model.mm_projector.0.bias": "linear_1.bias",
                                "model.mm_projector.2.weight": "linear_2.weight", "model.mm_projector.2.bias": "linear_2.bias"}}
    proj = projector[layout.projector]

    def rename(name: str) -> str | None:
        if (name.endswith("rotary_emb.inv_freq") or name.startswith("model.vision_tower.")
                or name.startswith(layout.ignored_prefixes)):
            return None   # rebuilt from the config / read from the CLIP folder / not run
        if name.startswith(layout.sam_prefix):
            return "mask_decoder.sam." + name[len(layout.sam_prefix):]
        if name.startswith("model.text_hidden_fcs.0."):
            return "seg_projection.net." + name[len("model.text_hidden_fcs.0."):]
        if name in proj:
            return "vlm.model.multi_modal_projector." + proj[name]
        if name.startswith("lm_head."):
            return "vlm." + name
        if name.startswith("model."):
            return "vlm.model.language_model." + name[len("model."):]
        return "unknown." + name   # fails loudly in load_mapped
    return rename


def _clip_names(tower: str) -> Callable[[str], str | None]:
    """A CLIPModel's or CLIPVisionModel's names (``vision_model.*``; transformers 5 saves a CLIPVisionModel
    without that prefix) -> the VLM's vision tower; the text tower and projections are not used."""
    def rename(name: str) -> str | None:
        name = name[len("vision_model."):] if name.startswith("vision_model.") else name
        if name.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
            return tower + name
        return None
    return rename


# ---- the processor ---------------------------------------------------------------------------------------------
class LlavaV1Processor(GroundingProcessor):
    """GroundingProcessor's interface with LISA's preprocessing (module docstring)."""

    def __init__(self, tokenizer: SlowLlamaTokenizer, config: GroundingConfig, vision_image_size: int,
                 num_image_tokens: int, layout: LlavaV1Layout, image_token_id: int):
        self.tokenizer = tokenizer
        self.config = config
        self.layout = layout
        self.vision_image_size = vision_image_size
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.seg_token_id = tokenizer.convert_tokens_to_ids("[SEG]")
        self._mean = np.asarray(config.image_mean, np.float32)
        self._std = np.asarray(config.image_std, np.float32)
        self._reserved = [IMAGE_MARK, "</s>", "<s>", *tokenizer.added]

    def vision_pixels(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``H x W x 3`` -> ``[3, s, s]`` float32 as 4.31's CLIPImageProcessor makes it."""
        s = self.vision_image_size
        h, w = image.shape[:2]
        if min(h, w) != s:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            h, w = (new_long, s) if w <= h else (s, new_long)
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC, reducing_gap=None))
        top, left = (h - s) // 2, (w - s) // 2
        crop = image[top:top + s, left:left + s]
        x = (crop * (1 / 255)).astype(np.float32)
        x = (x - self._mean) / self._std
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    def build_prompt(self, question: str, visual_prompts: str = "") -> str:
        if visual_prompts:
            raise PromptError(f"{self.layout.family} checkpoints read no clicks or boxes in a question: ask in words, "
                              "or click without a question")
        for token in self._reserved:   # the user's text must not smuggle in image slots or the template's tokens
            question = question.replace(token, " ")
        question = question.strip()
        if not question:
            raise QuestionError("the question is empty")
        image = self.layout.image_text.format(image=f"<im_start>{IMAGE_MARK}<im_end>")
        return f"{LLAVA_V1_SYSTEM} USER: {image}{question} ASSISTANT:"

    def encode(self, prompt: str, answer: str | None = None) -> EncodedText:
        """``tokenizer_image_token`` of LLaVA's code: ``<s>``, the pieces around ``<image>`` tokenised one by one,
        ``num_image_tokens`` image slots between them; then the answer and ``</s>`` (as the template writes
        ``ASSISTANT: {answer}</s>``, the slow tokenizer's stripping makes both tokenisations the same)."""
        tok = self.tokenizer
        ids = [tok.bos_token_id]
        for i, piece in enumerate(prompt.split(IMAGE_MARK)):
            if i:
                ids += [self.image_token_id] * self.num_image_tokens
            ids += tok.tokenize_ids(piece)
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            answer_ids = tok.tokenize_ids(answer.strip()) + [tok.eos_token_id]
            ids, labels = ids + answer_ids, labels + answer_ids
        if len(ids) > self.config.max_length:
            raise QuestionError(f"the question is too long: {len(ids)} tokens with the image, the model accepts "
                                f"{self.config.max_length}")
        return EncodedText(ids, labels)
