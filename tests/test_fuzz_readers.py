"""Fuzz: random and mutated files into every reader of the pack.

The property, for every reader and every input: either a correct load, or the pack's own error type
(TLoraError or a subclass) whose message names the file. Never another exception, never NaN factors.

Inputs: the bytes of valid files of every known format, truncated, overwritten, cut and spliced; random
bytes behind each format's magic; well-formed safetensors files with random keys, shapes, dtypes and
metadata; hand-built safetensors headers; torch.save'd objects of any shape; random hparams.yml text.

Examples per test: TLORA_FUZZ_EXAMPLES (default 200; the whole file runs in well under a minute on 2 cores).
"""
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from support import reference_files as ref
from tlora_pack.tlora_core import readers
from tlora_pack.tlora_core.config import TLoraConfig
from tlora_pack.tlora_core.errors import TLoraError
from tlora_pack.tlora_core.export import save_standard_lora
from tlora_pack.tlora_core.format import FORMAT_NAME, TLora, load_tlora, read_safetensors, save_tlora
from tlora_pack.tlora_core.init import ortho_factors, vanilla_factors

pytestmark = pytest.mark.filterwarnings("ignore")  # torch.load warns about odd pickle protocols it then refuses

EXAMPLES = int(os.environ.get("TLORA_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

LYCO_SHAPE = (6, 4)  # [out, in] of the LyCORIS seed's layers
LYCO_BASE = torch.randn(LYCO_SHAPE, generator=torch.Generator().manual_seed(7))
SDXL_PROC = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"


def _lyco_base(layer_key):
    return LYCO_BASE


# Every reader a user's file can reach, by name; each takes a path.
READERS = {
    "read_any": readers.read_any,
    "read_any_with_model_weights": lambda p: readers.read_any(p, base_weights=_lyco_base),
    "load_tlora": load_tlora,
    "read_safetensors": read_safetensors,
    "load_state_dict": readers.load_state_dict,
    "read_reference_sdxl": readers.read_reference_sdxl,
    "read_reference_flux": readers.read_reference_flux,
    "read_lycoris": lambda p: readers.read_lycoris(p, base_weights=_lyco_base),
}


def check_reader(name, path: Path):
    """Run one reader: a correct load passes its checks, a refusal is a TLoraError naming the file."""
    try:
        out = READERS[name](path)
    except TLoraError as exc:
        assert path.name in str(exc), f"{name}: the message does not name the file: {exc}"
        return "refused"
    if isinstance(out, TLora):
        assert out.layers and all(torch.isfinite(t).all() for f in out.layers.values() for t in f.tensors().values())
        assert 1 <= out.config.min_rank <= out.config.rank
        TLoraConfig.from_json(out.config.to_json())  # what was read can be written again
    else:
        tensors, metadata = out
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    return "loaded"


def check_every_reader(path: Path):
    return {name: check_reader(name, path) for name in READERS}


# ---- seeds: one valid file of every format -----------------------------------------------------------

def _pack_tlora(ortho=True):
    make = (lambda i, o, k: ortho_factors(i, o, 2, seed=1, layer_key=k)) if ortho else \
        (lambda i, o, k: vanilla_factors(i, o, 2, seed=1, layer_key=k))
    layers = {k: make(i, o, k) for k, i, o in (("diffusion_model.a.attn1.to_q", 4, 6), ("diffusion_model.b.ff", 3, 5))}
    for f in layers.values():
        f.up = f.up + 0.1
    return TLora(TLoraConfig(rank=2, min_rank=1, base_model="SD15", variant="tlora" if ortho else "vanilla_tlora"),
                 layers)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """name -> bytes of a valid file (each loads through at least one reader)."""
    root = tmp_path_factory.mktemp("fuzz_seeds")
    paths = {
        "pack_fp32": save_tlora(_pack_tlora(), root / "pack32.safetensors", "fp32"),
        "pack_fp16": save_tlora(_pack_tlora(), root / "pack16.safetensors", "fp16"),
        "pack_vanilla_bf16": save_tlora(_pack_tlora(False), root / "packv.safetensors", "bf16"),
        "sdxl_ortho": ref.write_sdxl_checkpoint(root / "sdxl", ref.sdxl_state([SDXL_PROC], 2, True, 6, 4)),
        "sdxl_vanilla": ref.write_sdxl_checkpoint(root / "sdxlv", ref.sdxl_state([SDXL_PROC], 2, False, 6, 4)),
        "flux_zip": ref.write_flux_checkpoint(root / "flux", ref.flux_state(1, 1, 4, 2)),
    }
    legacy = root / "flux_legacy" / "lora.pt"
    legacy.parent.mkdir()
    torch.save(ref.flux_state(1, 0, 4, 2), str(legacy), _use_new_zipfile_serialization=False)
    paths["flux_legacy"] = legacy
    state, _ = ref.lycoris_state({"lycoris_a_to_q": LYCO_BASE, "lycoris_b_to_k": LYCO_BASE}, rank=2, alpha=1.0)
    paths["lycoris"] = root / "lyco.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["lycoris"]))
    paths["standard_lora"] = root / "std.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(6, 2),
               "lora_unet_x.alpha": torch.tensor(2.0)}, str(paths["standard_lora"]))
    paths["exported_lora"], _ = save_standard_lora(_pack_tlora(), root / "exported.safetensors")
    data = {name: Path(p).read_bytes() for name, p in paths.items()}
    for name, p in paths.items():  # every seed is a valid file of its kind
        if name not in ("standard_lora", "exported_lora"):
            assert "loaded" in check_every_reader(Path(p)).values(), name
    return data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_scratch")


def write(folder: Path, data: bytes, name="fuzzed.safetensors") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# ---- 1. mutated valid files --------------------------------------------------------------------------

def _apply(data: bytearray, op) -> bytearray:
    kind, where, value = op
    n = len(data)
    if n == 0:
        return data
    head = max(1, min(n, 64 + 8 + int.from_bytes(bytes(data[:2]), "little")))  # the header and a little past it
    pos = where % (head if kind.endswith("_head") else n)
    kind = kind.removesuffix("_head")
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        data[pos] = value[0] if value else data[pos] ^ 0xFF
    elif kind == "delete":
        del data[pos:pos + 1 + len(value)]
    elif kind == "insert":
        data[pos:pos] = value
    elif kind == "overwrite":
        data[pos:pos + len(value)] = value
    elif kind == "duplicate":
        data[pos:pos] = data[pos:pos + 1 + len(value) * 8]
    return data


MUTATION = st.tuples(
    st.sampled_from(["truncate", "flip", "delete", "insert", "overwrite", "duplicate",
                     "truncate_head", "flip_head", "delete_head", "insert_head", "overwrite_head"]),
    st.integers(0, 2 ** 20),
    st.binary(max_size=16))


@FUZZ
@given(data=st.data(), mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_files_load_correctly_or_raise_the_packs_error(seeds, scratch, data, mutations):
    name = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    raw = bytearray(seeds[name])
    for op in mutations:
        raw = _apply(raw, op)
    check_every_reader(write(scratch, bytes(raw), "mutated_" + ("lora.pt" if "flux" in name else "x.safetensors")))


def test_every_truncation_of_every_seed_is_refused(seeds, scratch):
    """Not random: each seed cut at 64 evenly spaced lengths (0 and one byte short included)."""
    for name, raw in seeds.items():
        cuts = sorted({0, len(raw) - 1} | {len(raw) * i // 64 for i in range(64)})
        for cut in cuts:
            path = write(scratch, raw[:cut], f"cut_{name}")
            outcomes = check_every_reader(path)
            assert set(outcomes.values()) == {"refused"}, (name, cut, outcomes)


# ---- 2. random bytes behind each format's magic -------------------------------------------------------

MAGICS = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19",
          struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 64) + b"{", struct.pack("<Q", 2 ** 62) + b"{",
          b"\x00" * 8 + b"{"]


@FUZZ
@given(magic=st.sampled_from(MAGICS), body=st.binary(max_size=2048))
def test_random_bytes_are_refused_with_the_packs_error(scratch, magic, body):
    outcomes = check_every_reader(write(scratch, magic + body, "random.bin"))
    tlora_readers = set(READERS) - {"read_safetensors", "load_state_dict"}  # `{}` is a valid, empty safetensors
    assert {outcomes[name] for name in tlora_readers} == {"refused"}


# ---- 3. well-formed safetensors files with random content ---------------------------------------------

KEY_PREFIXES = ["diffusion_model.a.attn1.to_q.tlora_", "diffusion_model.b.tlora_", f"{SDXL_PROC}.to_q_lora.",
                f"{SDXL_PROC}.to_out_lora.", "transformer_blocks.0.attn.processor.to_k_lora.",
                "single_transformer_blocks.0.attn.processor.to_q_lora.", "lycoris_a_to_q.", "lora_unet_x.", "x."]
KEY_FIELDS = ["down", "up", "scale", "base_down", "base_up", "base_scale", "gate", "q_layer.weight",
              "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda", "down.weight",
              "up.weight", "alpha", "lora_down.weight", "lora_up.weight"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64,
          torch.bool, torch.float8_e4m3fn]
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                      st.text(max_size=8))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=8)
CONFIG_FIELDS = ["rank", "min_rank", "exponent", "max_timestep", "variant", "init", "base_model", "trigger",
                 "class_word", "source", "training", "future_field"]


@st.composite
def tensors_strategy(draw):
    out = {}
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(KEY_PREFIXES)) + draw(st.sampled_from(KEY_FIELDS))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        value = torch.randn(shape, generator=gen) * draw(st.sampled_from([1.0, 1e3, 1e30]))
        if value.numel() and draw(st.booleans()):
            value.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))
        out[key] = value.to(dtype)
    return out


@st.composite
def metadata_strategy(draw):
    kind = draw(st.sampled_from(["none", "pack", "pack", "other"]))
    if kind == "none":
        return None
    if kind == "other":
        return draw(st.dictionaries(st.sampled_from(["format", "tlora.format", "tlora.export_format", "x"]),
                                    st.text(max_size=12), max_size=3))
    config = draw(st.fixed_dictionaries({}, optional={f: JSON_ANY for f in CONFIG_FIELDS}))
    for name, good in (("rank", 2), ("min_rank", 1), ("variant", "tlora")):
        if draw(st.booleans()):
            config[name] = good
    meta = {"tlora.format": draw(st.sampled_from([FORMAT_NAME, FORMAT_NAME, "comfyui-tlora-2", ""])),
            "tlora.format_version": draw(st.sampled_from(["1", "1", "2", "0", "-1", "x", "", " 1", "1e3"])),
            "tlora.config": json.dumps(config) if draw(st.integers(0, 9)) else draw(st.text(max_size=20)),
            "tlora.residuals": draw(st.sampled_from(["0", "1", "yes"]))}
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=2)):
        meta.pop(key, None)
    return meta


@FUZZ
@given(tensors=tensors_strategy(), metadata=metadata_strategy())
def test_wellformed_safetensors_with_random_keys_shapes_dtypes_and_metadata(scratch, tensors, metadata):
    path = scratch / "random_content.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    check_every_reader(path)


@FUZZ
@given(entries=st.dictionaries(
    st.text(max_size=10),
    st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "U64", "F4",
                                  "E8M0", "", "f32", "XYZ"]),
        "shape": st.lists(st.integers(-2, 2 ** 40), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 2 ** 40), min_size=0, max_size=3)}),
    max_size=3),
    metadata=st.one_of(st.none(), JSON_ANY, st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
    body=st.binary(max_size=256), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, -8]))
def test_handmade_safetensors_headers_are_loaded_or_refused(scratch, entries, metadata, body, length_delta):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", max(0, len(text) + length_delta)) + text + body
    check_every_reader(write(scratch, raw, "handmade.safetensors"))


# ---- 4. torch.save'd objects of every shape ------------------------------------------------------------

PICKLABLE = st.recursive(
    st.one_of(JSON_LEAF, st.builds(lambda n: torch.ones(n), st.integers(0, 3)),
              st.sampled_from([torch.ones(2, 2).to_sparse(), torch.ones(2, dtype=torch.complex64),
                               torch.tensor(float("nan")), torch.ones(2, 3)])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3)),
    max_leaves=6)


@FUZZ
@given(obj=st.one_of(PICKLABLE, st.dictionaries(
    st.sampled_from(["transformer_blocks.0.attn.processor.to_q_lora.down.weight",
                     "transformer_blocks.0.attn.processor.to_q_lora.up.weight", "x"]), PICKLABLE, max_size=3)),
    zip_format=st.booleans())
def test_torch_files_of_any_content_are_loaded_or_refused(scratch, obj, zip_format):
    path = scratch / "checkpoint-1" / "lora.pt"
    path.parent.mkdir(exist_ok=True)
    try:
        torch.save(obj, str(path), _use_new_zipfile_serialization=zip_format)
    except (RuntimeError, TypeError, ValueError):  # torch cannot save some of these (e.g. a legacy sparse tensor)
        assume(False)
    check_every_reader(path)


# ---- 5. hparams.yml next to a valid reference checkpoint ---------------------------------------------

HPARAM_VALUES = st.one_of(JSON_LEAF, st.sampled_from([".inf", "-.inf", ".nan", "1e999", "2024-13-45", "2024-01-01",
                                                      "!!python/tuple [1, 2]", "[1, 2]", "{a: 1}", "0x10", "~",
                                                      "'8'", "!!binary aGVsbG8=", "*undefined_alias"]))


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(list(readers.HPARAM_FIELDS) + ["wandb_api_key", "other"]),
                              HPARAM_VALUES, max_size=6),
       raw_tail=st.one_of(st.just(""), st.text(max_size=40)))
def test_hparams_of_any_content_give_a_valid_tlora_or_the_packs_error(tmp_path_factory, fields, raw_tail):
    root = tmp_path_factory.mktemp("hp")
    path = ref.write_sdxl_checkpoint(root, ref.sdxl_state([SDXL_PROC], 2, True, 6, 4))
    hp = root / "logs" / "hparams.yml"
    hp.parent.mkdir()
    lines = [f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in fields.items()]
    hp.write_text("\n".join(lines) + "\n" + raw_tail, encoding="utf-8")
    try:
        readers.read_hparams(hp)
    except TLoraError as exc:
        assert "hparams.yml" in str(exc)
    try:
        tlora = readers.read_reference_sdxl(path)
    except TLoraError as exc:
        assert "hparams.yml" in str(exc) or path.name in str(exc)
        return
    json.dumps(json.loads(tlora.config.to_json()))
    assert 1 <= tlora.config.min_rank <= tlora.config.rank


@pytest.mark.parametrize("text", [b"[" * 3000, b"{a: " * 3000, b"a: &x [*x]\n", b"\xff\xfe\x00\x80", b"\x00",
                                  b"lora_rank: 1e999\n", b"min_rank: .inf\n", b"min_rank: 2024-13-45\n",
                                  b"trainer_type: 2024-01-01\nsig_type: [1, 2]\n", b"tlora: {a: [1]}\n",
                                  b"min_rank: !!python/object/apply:os.system ['echo pwned']\n"])
def test_pathological_hparams_are_refused_or_read(tmp_path, text):
    path = ref.write_sdxl_checkpoint(tmp_path, ref.sdxl_state([SDXL_PROC], 2, True, 6, 4))
    hp = tmp_path / "logs" / "hparams.yml"
    hp.parent.mkdir()
    hp.write_bytes(text)
    try:
        tlora = readers.read_reference_sdxl(path)
    except TLoraError as exc:
        assert str(hp) in str(exc) or str(path) in str(exc)
        return
    json.dumps(json.loads(tlora.config.to_json()))  # what was kept is plain JSON, ready for the file's metadata
