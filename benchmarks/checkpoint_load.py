"""Loading a big LISA-format checkpoint: groundseg's loader against the time to read its files, and peak memory
against their size (issue targets: load <= 1.5x read, peak RSS <= 1.3x the files).

A random ~1.1B-parameter LISA folder (TinyLlama-sized language model, bf16 ``pytorch_model-*.bin`` shards as LISA's
merge script writes them, the tiny fixture's SAM and CLIP) is written once to ``--workdir``. Each measurement runs
in a fresh process (page cache warm for both, so "read" is memory bandwidth, not disk):
- read: ``torch.load`` of every shard, every tensor touched (summed);
- load: ``load_checkpoint`` of the converted directory in bf16 (the language model built on the meta device).

    python benchmarks/checkpoint_load.py [--workdir /tmp/groundseg-bench-load]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lisa" / "lisa-13b-llama2"
CLIP = REPO / "tests" / "fixtures" / "lisa" / "clip-vit-l14-shaped"
SIZE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32)

CHILD = {
    "read": """
import sys, time, torch, resource
from pathlib import Path
t = time.perf_counter(); total = 0
for f in sorted(Path(sys.argv[1]).glob("pytorch_model-*.bin")):
    for v in torch.load(f, map_location="cpu", weights_only=True).values():
        total += float(v[..., :1].float().sum()) * 0 + v.numel()
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total)
""",
    "load": """
import sys, time, torch, resource
from grounding.checkpoint import load_checkpoint
t = time.perf_counter()
model, _ = load_checkpoint(sys.argv[1], dtype=torch.bfloat16)
total = sum(p.numel() for p in model.parameters())
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total)
""",
}


def make_folder(root: Path) -> Path:
    """The random big LISA folder (written once; reused while its config matches)."""
    folder = root / "lisa-1b"
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(SIZE, num_key_value_heads=SIZE["num_attention_heads"])
    if (folder / "done").is_file() and json.loads((folder / "config.json").read_text()) == config:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(FIXTURE / name, folder / name)
    small = torch.load(FIXTURE / "pytorch_model.bin", weights_only=True)
    h, v, inter = SIZE["hidden_size"], config["vocab_size"], SIZE["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    shard = {k: t for k, t in small.items() if k.startswith(("model.visual_model.",))}
    shard.update({"model.embed_tokens.weight": rand(v, h), "model.norm.weight": rand(h), "lm_head.weight": rand(v, h),
                  "model.mm_projector.weight": rand(h, small["model.mm_projector.weight"].shape[1]),
                  "model.mm_projector.bias": rand(h),
                  "model.text_hidden_fcs.0.0.weight": rand(h, h), "model.text_hidden_fcs.0.0.bias": rand(h),
                  "model.text_hidden_fcs.0.2.weight": rand(32, h), "model.text_hidden_fcs.0.2.bias": rand(32)})
    shards = [shard]
    for i in range(SIZE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {p + f"self_attn.{n}_proj.weight": rand(h, h) for n in "qkvo"}
        layer.update({p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                      p + "mlp.down_proj.weight": rand(h, inter), p + "input_layernorm.weight": rand(h),
                      p + "post_attention_layernorm.weight": rand(h)})
        if i % 6 == 0:
            shards.append({})
        shards[-1].update(layer)
    for i, part in enumerate(shards, 1):
        torch.save(part, folder / f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "done").write_text("")
    return folder


def run(kind: str, path: Path) -> tuple[float, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD[kind], str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True)
    seconds, rss, numel = out.stdout.split()
    return float(seconds), int(rss), int(float(numel))


def main() -> None:
    from apps.convert_cmd import convert_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/groundseg-bench-load"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    folder = make_folder(args.workdir)
    model_dir = convert_checkpoint("lisa", folder, CLIP, args.workdir / "converted")
    size = sum(f.stat().st_size for f in folder.glob("pytorch_model-*.bin"))
    run("read", folder)   # warm the page cache
    reads = [run("read", folder) for _ in range(args.repeats)]
    loads = [run("load", model_dir) for _ in range(args.repeats)]
    read_s, load_s = min(r[0] for r in reads), min(r[0] for r in loads)
    rss = min(r[1] for r in loads)
    print(f"checkpoint: {loads[0][2] / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB in "
          f"{len(list(folder.glob('pytorch_model-*.bin')))} files")
    print(f"read files {read_s:.2f} s | load_checkpoint {load_s:.2f} s | ratio {load_s / read_s:.2f}x (target <= 1.5x)")
    print(f"peak RSS while loading {rss / 2**30:.2f} GiB | files {size / 2**30:.2f} GiB | ratio {rss / size:.2f}x "
          "(target <= 1.3x)")


if __name__ == "__main__":
    main()
