"""Loading checkpoints safely: nothing outside the folder, nothing but safetensors,
and every tensor held against config.json before a model is built.

Every case writes a real checkpoint (``save_pretrained``, safetensors) and
breaks it the way a bad or hostile download would: an index that names
``../elsewhere.safetensors``, an absolute path or a symlink out of the
folder; a shard missing, a shard that does not hold what its index says, a
tensor held twice; a projection with an extra row, a norm of the wrong size,
an ``lm_head`` of another vocabulary; integer, bool and float8 tensors; a
``quantization_config``. Each is a :class:`~kvforge.errors.ModelError`
naming the entry, file or tensor, raised by ``load_checkpoint`` (which reads
only headers), so no model is built and no tensor is read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from kvforge.engine import Engine, SamplingParams  # noqa: E402
from kvforge.engine.loader import INDEX_FILE, SafetensorsWeights, load_checkpoint  # noqa: E402
from kvforge.engine.model_config import ModelConfig, read_config  # noqa: E402
from kvforge.engine.models.llama import LlamaModel  # noqa: E402
from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint, tiny_hf_model  # noqa: E402
from kvforge.errors import ModelError  # noqa: E402

PROMPT = [5, 17, 99, 3, 42, 8]

#: tiny checkpoints with every optional tensor between them: biases on every projection and an
#: untied lm_head (Llama), q/k norms (Qwen3)
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "qwen3": ("Qwen3ForCausalLM", dict()),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for kind, (arch, options) in KINDS.items():
        folder = str(tmp_path_factory.mktemp(kind))
        save_tiny_checkpoint(arch, folder, eos_token_id=None, **options)
        out[kind] = folder
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    """A Qwen2 checkpoint in several shards with model.safetensors.index.json."""
    folder = str(tmp_path_factory.mktemp("sharded"))
    model = tiny_hf_model("Qwen2ForCausalLM", eos_token_id=None)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert len(_shards(folder)) >= 3
    return folder, model


def _shards(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INDEX_FILE).read_text())


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index))


def _edit(folder: Path, change: Callable[[dict[str, torch.Tensor]], None], file: str = "model.safetensors") -> None:
    tensors = load_file(folder / file)
    change(tensors)
    save_file(tensors, folder / file, metadata={"format": "pt"})


def _refused(folder: Path | str, match: str) -> ModelError:
    """``load_checkpoint`` (headers only) and ``Engine`` both refuse the folder with ``match``."""
    with pytest.raises(ModelError, match=match) as caught:
        load_checkpoint(folder, tokenizer=False)
    with pytest.raises(ModelError, match=match):
        Engine(str(folder), num_blocks=8, block_size=8)
    return caught.value


def _loads_and_matches(folder: Path | str, model: Any) -> None:
    out = Engine(str(folder), num_blocks=32, block_size=8).generate([PROMPT], SamplingParams(max_tokens=6))
    assert out[0].token_ids == hf_greedy(model, PROMPT, 6)


# ------------------------------------------------------- the index stays inside the folder
def _move_a_shard_out(src: str, tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of ``src`` whose first shard lives outside the folder: (folder, shard name, outside path)."""
    folder = _copy(src, tmp_path / "ckpt")
    shard = _shards(str(folder))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / shard, outside)
    return folder, shard, outside


@pytest.mark.parametrize("entry", [
    "../elsewhere.safetensors", "./../elsewhere.safetensors", "sub/../../elsewhere.safetensors",
    "..\\elsewhere.safetensors", "ABSOLUTE",
])
def test_an_index_entry_outside_the_folder_is_refused(sharded: tuple[str, Any], tmp_path: Path, entry: str) -> None:
    folder, shard, outside = _move_a_shard_out(sharded[0], tmp_path)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index = _index(folder)
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    _write_index(folder, index)
    err = _refused(folder, re.escape(repr(entry)))
    assert "inside the checkpoint folder" in str(err)


def test_a_symlink_out_of_the_folder_is_refused(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder, shard, outside = _move_a_shard_out(sharded[0], tmp_path)
    os.symlink(outside, folder / shard)  # the index is unchanged: it names a link that leaves the folder
    err = _refused(folder, re.escape(repr(shard)) + ".*outside the checkpoint folder")
    assert str(outside) in str(err)
    # a relative link climbing out is the same
    os.remove(folder / shard)
    os.symlink(os.path.join("..", outside.name), folder / shard)
    _refused(folder, "outside the checkpoint folder")


def test_a_single_file_or_index_linked_from_outside_is_refused(ckpts: dict[str, str], sharded: tuple[str, Any],
                                                               tmp_path: Path) -> None:
    single = _copy(ckpts["qwen3"], tmp_path / "single")
    shutil.move(single / "model.safetensors", tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", single / "model.safetensors")
    _refused(single, "model.safetensors resolves to .*outside the checkpoint folder")
    folder = _copy(sharded[0], tmp_path / "index")
    shutil.move(folder / INDEX_FILE, tmp_path / "index.json")
    os.symlink(tmp_path / "index.json", folder / INDEX_FILE)
    _refused(folder, re.escape(INDEX_FILE) + " resolves to .*outside the checkpoint folder")


def test_links_and_subfolders_inside_the_folder_load(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    shards = _shards(str(folder))
    (folder / "weights").mkdir()
    shutil.move(folder / shards[0], folder / "weights" / shards[0])  # the index names weights/<shard>
    os.symlink(os.path.join("weights", shards[0]), folder / "link.safetensors")
    shutil.move(folder / shards[1], folder / "weights" / shards[1])
    os.symlink(os.path.join("weights", shards[1]), folder / shards[1])  # the index names the link
    index = _index(folder)
    index["weight_map"] = {k: (f"weights/{v}" if v == shards[0] else v) for k, v in index["weight_map"].items()}
    _write_index(folder, index)
    _loads_and_matches(folder, sharded[1])


def test_a_hugging_face_cache_snapshot_loads(ckpts: dict[str, str], tmp_path: Path) -> None:
    """``hub/models--x/snapshots/<rev>/`` holds symlinks into ``models--x/blobs``: that is not an escape."""
    repo = tmp_path / "models--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in os.listdir(ckpts["qwen3"]):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copy(os.path.join(ckpts["qwen3"], name), blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / name)
    ckpt = load_checkpoint(snap, tokenizer=False)
    assert ckpt.config.architecture == "Qwen3ForCausalLM"
    assert ckpt.weights["model.norm.weight"].shape == (64,)
    # ... but a link from the snapshot to anywhere else is still refused
    os.remove(snap / "model.safetensors")
    shutil.copy(os.path.join(ckpts["qwen3"], "model.safetensors"), repo / "other.safetensors")
    os.symlink(os.path.join("..", "..", "other.safetensors"), snap / "model.safetensors")
    _refused(snap, "outside the checkpoint folder")


# ------------------------------------------------------------ only safetensors, ever
def test_an_index_naming_a_pickle_file_is_refused(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    shard = _shards(str(folder))[0]
    torch.save(load_file(folder / shard), folder / "pytorch_model-00001.bin")
    index = _index(folder)
    index["weight_map"] = {k: ("pytorch_model-00001.bin" if v == shard else v) for k, v in index["weight_map"].items()}
    _write_index(folder, index)
    _refused(folder, "'pytorch_model-00001.bin'.*only .safetensors files are loaded")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_checkpoints_are_never_read(ckpts: dict[str, str], tmp_path: Path, name: str) -> None:
    folder = _copy(ckpts["qwen3"], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    torch.save(tensors, folder / name)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: name for k in tensors}}))
    _refused(folder, f"{re.escape(name)}: pickle checkpoints are never loaded")


def test_a_pickle_next_to_safetensors_is_ignored(ckpts: dict[str, str], tmp_path: Path) -> None:
    folder = _copy(ckpts["qwen3"], tmp_path / "ckpt")
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    weights = load_checkpoint(folder, tokenizer=False).weights
    assert {spec.file for spec in weights.specs.values()} == {os.path.realpath(folder / "model.safetensors")}


# ------------------------------------------------------- indexes, shards and their contents
@pytest.mark.parametrize("text, match", [
    ("{not json", "not a safetensors index.*not valid JSON"),
    (b"\xff\xfe{}", "not a safetensors index.*not UTF-8"),
    ("[]", "not a safetensors index.*expected a JSON object"),
    ('{"metadata": {}}', "'weight_map' must map tensor names to files"),
    ('{"weight_map": ["model.safetensors"]}', "'weight_map' must map tensor names to files"),
    ('{"weight_map": {}}', "'weight_map' must map tensor names to files"),
    ('{"weight_map": {"model.norm.weight": 3}}', "the file of tensor 'model.norm.weight' must be a string"),
    ('{"weight_map": {"model.norm.weight": "a.safetensors", "model.norm.weight": "b.safetensors"}}',
     "'model.norm.weight' is given twice"),
    ('{"weight_map": {"model.norm.weight": ""}}', "only plain paths inside the checkpoint folder"),
])
def test_a_malformed_index_is_refused(sharded: tuple[str, Any], tmp_path: Path, text: str | bytes, match: str) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    (folder / INDEX_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())
    _refused(folder, match)


def test_a_missing_shard_is_named(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    shard = _shards(str(folder))[1]
    os.remove(folder / shard)
    _refused(folder, f"entry {re.escape(repr(shard))} .*that file is missing")


def test_sharded_files_without_their_index_are_refused(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    os.remove(folder / INDEX_FILE)
    _refused(folder, f"sharded weights.*no {re.escape(INDEX_FILE)}")


def test_an_index_naming_a_tensor_its_shard_does_not_hold(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    index = _index(folder)
    name = "model.norm.weight"
    other = next(f for f in _shards(str(folder)) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    _write_index(folder, index)
    _refused(folder, f"names {re.escape(repr(other))} for tensor '{re.escape(name)}', but that file does not hold it")


def test_an_index_naming_a_tensor_no_shard_holds(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    index = _index(folder)
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = _shards(str(folder))[0]
    _write_index(folder, index)
    _refused(folder, "'model.layers.0.mlp.extra.weight', but that file does not hold it")


def test_a_shard_holding_a_tensor_the_index_does_not_name(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    index = _index(folder)
    name = "model.layers.1.mlp.down_proj.weight"
    del index["weight_map"][name]
    _write_index(folder, index)
    _refused(folder, f"holds tensor '{re.escape(name)}', which .*{re.escape(INDEX_FILE)} does not name")


def test_a_tensor_held_by_two_shards_is_refused(sharded: tuple[str, Any], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path / "ckpt")
    index = _index(folder)
    name = "model.norm.weight"
    other = next(f for f in _shards(str(folder)) if f != index["weight_map"][name])
    _edit(folder, lambda t: t.update({name: torch.ones(64)}), other)
    _refused(folder, f"tensor '{re.escape(name)}' is held by two files")


def test_a_tensor_held_by_two_unindexed_files_is_refused(ckpts: dict[str, str], tmp_path: Path) -> None:
    folder = _copy(ckpts["qwen3"], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[: len(names) // 2 + 1]}, folder / "a.safetensors")
    save_file({n: tensors[n] for n in names[len(names) // 2:]}, folder / "b.safetensors")
    _refused(folder, f"tensor '{re.escape(names[len(names) // 2])}' is held by two files")
    os.remove(folder / "b.safetensors")  # without the duplicate, the halves are just incomplete
    save_file({n: tensors[n] for n in names[len(names) // 2 + 1:]}, folder / "b.safetensors")
    assert len(load_checkpoint(folder, tokenizer=False).weights) == len(tensors)


# ------------------------------------------------- every tensor's shape, before the model is built
def _grown(t: torch.Tensor) -> torch.Tensor:
    """One more row (or element): the mistake that used to load and fail at the first forward."""
    return torch.cat([t, t[:1]])


LLAMA_TENSORS = [
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
    "model.layers.1.self_attn.v_proj.bias", "model.layers.0.self_attn.o_proj.bias",
    "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.gate_proj.bias", "model.layers.0.mlp.up_proj.bias", "model.layers.1.mlp.down_proj.bias",
]
QWEN3_TENSORS = ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight",
                 "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize("kind, name", [("llama", n) for n in LLAMA_TENSORS] + [("qwen3", n) for n in QWEN3_TENSORS])
def test_a_tensor_of_the_wrong_shape_is_named(ckpts: dict[str, str], tmp_path: Path, kind: str, name: str) -> None:
    folder = _copy(ckpts[kind], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    want = tuple(tensors[name].shape)
    _edit(folder, lambda t: t.update({name: _grown(t[name])}))
    got = (want[0] + 1,) + want[1:]
    _refused(folder, re.escape(f"tensor {name!r}") + ".*" + re.escape(f"has shape {got}, expected {want}"))


@pytest.mark.parametrize("name, make", [
    ("model.layers.0.mlp.down_proj.weight", lambda t: t.t().contiguous()),  # transposed: [128, 64] for [64, 128]
    ("lm_head.weight", lambda t: t[:-1].contiguous()),  # a smaller vocabulary than vocab_size
    ("model.norm.weight", lambda t: t.reshape(1, -1).contiguous()),  # 2-D
    ("model.layers.0.self_attn.q_proj.bias", lambda t: t[None].contiguous()),
])
def test_other_wrong_shapes(ckpts: dict[str, str], tmp_path: Path, name: str,
                            make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    folder = _copy(ckpts["llama"], tmp_path / "ckpt")
    _edit(folder, lambda t: t.update({name: make(t[name])}))
    _refused(folder, re.escape(f"tensor {name!r}") + ".*has shape")


def test_missing_and_left_over_tensors_are_named(ckpts: dict[str, str], tmp_path: Path) -> None:
    folder = _copy(ckpts["qwen3"], tmp_path / "ckpt")
    _edit(folder, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    _refused(folder, "has no tensor 'model.layers.1.self_attn.k_norm.weight'")
    folder = _copy(ckpts["qwen3"], tmp_path / "untied")
    _edit(folder, lambda t: t.pop("lm_head.weight"))
    _refused(folder, "no tensor 'lm_head.weight' and tie_word_embeddings is false")
    folder = _copy(ckpts["qwen3"], tmp_path / "extra")
    _edit(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    _refused(folder, r"1 tensor\(s\) the engine would not use: model\.layers\.0\.self_attn\.q_proj\.bias")


# ------------------------------------------------- integer and quantized tensors are refused
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_integer_and_quantized_tensors_are_refused(ckpts: dict[str, str], tmp_path: Path, dtype: torch.dtype) -> None:
    folder = _copy(ckpts["qwen3"], tmp_path / "ckpt")
    name = "model.layers.1.self_attn.o_proj.weight"
    _edit(folder, lambda t: t.update({name: (t[name] * 100).to(dtype)}))  # the same shape: only the dtype is wrong
    dtype_name = str(dtype).removeprefix("torch.")
    _refused(folder, re.escape(f"tensor {name!r}") + f".*has dtype {dtype_name}.*no quantized format is supported")


def test_a_quantized_checkpoint_is_refused(ckpts: dict[str, str], tmp_path: Path) -> None:
    """GPTQ-like: int32 packed weights, float16 scales; with and without its quantization_config."""
    folder = _copy(ckpts["qwen3"], tmp_path / "ckpt")
    name = "model.layers.0.mlp.down_proj"

    def quantize(t: dict[str, torch.Tensor]) -> None:
        t.pop(name + ".weight")
        t[name + ".qweight"] = torch.zeros(16, 64, dtype=torch.int32)
        t[name + ".scales"] = torch.ones(1, 64, dtype=torch.float16)

    _edit(folder, quantize)
    _refused(folder, re.escape(f"tensor '{name}.qweight'") + ".*has dtype int32")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(cfg))
    _refused(folder, "quantization_config \\(quant_method='gptq'\\).*supports no quantized format \\(none yet\\)")


def test_headers_are_read_not_tensors(ckpts: dict[str, str]) -> None:
    weights = SafetensorsWeights(ckpts["llama"])
    assert not weights._handles  # nothing opened for reading tensors yet
    tensors = load_file(os.path.join(ckpts["llama"], "model.safetensors"))
    assert {n: (s.shape, s.dtype) for n, s in weights.specs.items()} == {
        n: (tuple(t.shape), "float32") for n, t in tensors.items()}
    assert "lm_head.weight" in weights and "nope" not in weights and not weights._handles
    assert torch.equal(weights["lm_head.weight"], tensors["lm_head.weight"])


# ------------------------------------------------- float16 / bfloat16 / float32 are cast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_load_cast_to_the_model_dtype(ckpts: dict[str, str], tmp_path: Path,
                                                             dtype: torch.dtype) -> None:
    folder = _copy(ckpts["qwen3"], tmp_path / "ckpt")
    original = load_file(folder / "model.safetensors")
    _edit(folder, lambda t: t.update({n: v.to(dtype) for n, v in t.items() if n.endswith("norm.weight")}))
    engine = Engine(str(folder), num_blocks=16, block_size=8)
    assert engine.dtype == torch.float32
    want = original["model.norm.weight"].to(dtype).float()
    assert engine.model.norm.dtype == torch.float32 and torch.equal(engine.model.norm, want)
    assert torch.equal(engine.model.layers[1].k_norm,
                       original["model.layers.1.self_attn.k_norm.weight"].to(dtype).float())


# ------------------------------------------------- from_state_dict checks a plain dict the same way
def test_from_state_dict_checks_a_plain_dict(ckpts: dict[str, str]) -> None:
    config = ModelConfig.from_hf(read_config(ckpts["llama"]))
    tensors = load_file(os.path.join(ckpts["llama"], "model.safetensors"))
    build = lambda t: LlamaModel.from_state_dict(config, t, dtype=torch.float32,  # noqa: E731
                                                 device=torch.device("cpu"))
    assert build(tensors).lm_head.shape == (128, 64)
    name = "model.layers.0.self_attn.v_proj.weight"
    with pytest.raises(ModelError, match=re.escape(f"tensor {name!r} has dtype int8")):
        build({**tensors, name: tensors[name].to(torch.int8)})
    with pytest.raises(ModelError, match=re.escape(f"tensor {name!r} has shape (33, 64), expected (32, 64)")):
        build({**tensors, name: _grown(tensors[name])})
    with pytest.raises(ModelError, match=re.escape(f"{name!r} is a list, not a tensor")):
        build({**tensors, name: [[0.0]]})
    with pytest.raises(ModelError, match="has no tensor 'model.norm.weight'"):
        build({n: t for n, t in tensors.items() if n != "model.norm.weight"})
