"""``groundseg convert lisa|glamm``: a model directory that every command accepts, made from a published
checkpoint folder and the CLIP folder it needs.

By default the directory only refers to the original files (``groundseg.json`` with their absolute paths): nothing
of the 14-26 GB is copied. ``--copy`` makes it self-contained: the checkpoint's weights rewritten as safetensors
(``vlm/``), its tokenizer files and the CLIP folder (``clip/``) inside it.
"""

import shutil
from pathlib import Path
from typing import Annotated

import typer

from grounding.config import GroundingConfig

convert_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Make a groundseg model directory from a LISA or GLaMM checkpoint folder.")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "config.json", "generation_config.json")


def convert_checkpoint(family: str, checkpoint: Path, clip: Path, out: Path, copy: bool = False) -> Path:
    """Check ``checkpoint`` (a ``family`` folder) and ``clip``, then write ``out/groundseg.json`` (and, with
    ``copy``, the files). Returns ``out``. CheckpointError (one line naming the path) for a bad folder."""
    from grounding.families import get_family
    from grounding.families.llava_v1 import check_clip_folder, check_folder

    layout = get_family(family).layout
    checkpoint, clip = checkpoint.expanduser().resolve(), clip.expanduser().resolve()
    raw = check_folder(checkpoint, layout, family)
    check_clip_folder(clip, raw)
    out.mkdir(parents=True, exist_ok=True)
    vlm_path, vision_path = str(checkpoint), str(clip)
    if copy:
        _copy_as_safetensors(checkpoint, out / "vlm")
        shutil.copytree(clip, out / "clip", dirs_exist_ok=True)
        vlm_path, vision_path = "vlm", "clip"
    config = GroundingConfig(family=family, vlm_path=vlm_path, vision_path=vision_path, seg_state="before",
                             decoder={"backend": "sam", "preset": "from-checkpoint"},
                             max_length=int(raw.get("max_position_embeddings", 2048)))
    config.save(out)
    return out


def _copy_as_safetensors(folder: Path, target: Path) -> None:
    """The checkpoint's tensors, one file at a time, into ``target/model-*.safetensors`` (+ its tokenizer files)."""
    import json

    from safetensors.torch import save_file

    from grounding.families.llava_v1_weights import iter_tensors, weight_files

    target.mkdir(parents=True, exist_ok=True)
    files = weight_files(folder)
    weight_map = {}
    for i, path in enumerate(files, 1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in iter_tensors(path)}
        save_file(tensors, str(target / (name + ".tmp")), metadata={"format": "pt"})
        (target / (name + ".tmp")).replace(target / name)
        weight_map.update({k: name for k in tensors})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / name)


def _command(family: str, source_option: str, what: str):
    def command(
        source: Annotated[Path, typer.Option(source_option, help=f"The {what} checkpoint folder (config.json, "
                                                                 "pytorch_model*.bin, tokenizer.model).")],
        clip: Annotated[Path, typer.Option(help="The CLIP folder it needs (weights/README.md says which).")],
        out: Annotated[Path, typer.Option(help="The model directory to write.")],
        copy: Annotated[bool, typer.Option("--copy", help="Copy the weights (as safetensors) and CLIP into OUT "
                                                          "instead of referring to them.")] = False,
    ) -> None:
        written = convert_checkpoint(family, source, clip, out, copy)
        typer.echo(f"wrote {written / 'groundseg.json'} ({family}; {'copied' if copy else 'refers to'} {source} and {clip})")
    command.__doc__ = f"A groundseg model directory from a {what} checkpoint and its CLIP tower."
    return command


convert_app.command("lisa")(_command("lisa", "--lisa", "LISA"))
convert_app.command("glamm")(_command("glamm", "--glamm", "GLaMM"))
