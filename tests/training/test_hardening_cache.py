"""Hardening of the stage-I feature cache (issue 20): paths stay inside, index.json and shard headers are
validated by one reader, cached tensors are checked as they are read, the cache is never written into a
protected or foreign folder, and fuzzed index files give only our own errors.

The caches here are built without any model (``make_cache``), so these tests take seconds.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.loading.finite import NonFiniteError
from diffsynth_templates.loading.write_safety import UnsafeOutputError, is_ours
from diffsynth_templates.training.feature_cache import (
    INDEX,
    ContentStore,
    FeatureCacheError,
    ShardWriter,
    check_index,
    clear_leftovers,
    merge_index,
    open_cache,
    read_index,
    read_shard_entries,
    scan_shards,
    write_initial_index,
)
from diffsynth_templates.training.features import SampleFeatures, content_key

FINGERPRINT = {"backbone": "flux2", "dataset": "tiny"}
CHANNELS, TEXT = (4, (3, 8))  # latents [4, 2, 2] for 32x32 images, text embeddings [3, 8]


def make_cache(root: Path, num_samples: int = 3, record_shapes: bool = True) -> Path:
    """``num_samples`` samples in shards of two, one edit image on sample 0, store inside the cache."""
    generator = torch.Generator().manual_seed(0)
    store = ContentStore(root / "store")
    write_initial_index(root, FINGERPRINT, root / "store")
    writer = ShardWriter(root, rank=0, chunk_size=2)
    for i in range(num_samples):
        latents_key, text_key = content_key("latents", i=i), content_key("text", i=i)
        store.put("latents", latents_key, torch.randn(CHANNELS, 2, 2, generator=generator))
        store.put("text", text_key, torch.randn(*TEXT, generator=generator))
        edit = [content_key("latents", edit=i)] if i == 0 else []
        for key in edit:
            store.put("latents", key, torch.randn(CHANNELS, 3, 1, generator=generator))
        shapes = {"latents": [CHANNELS, 2, 2], "text": list(TEXT), "edit": [[CHANNELS, 3, 1]] * len(edit)}
        writer.add(
            SampleFeatures(
                id=f"s{i}",
                order=i,
                line=i + 1,
                size=(32, 32),
                latents=None,
                prompt_embeds=None,
                template={"pooled": torch.randn(2, generator=generator), "scale": 0.5},
                keys={"text": text_key, "latents": latents_key, "edit": edit},
                shapes=shapes if record_shapes else {},
            )
        )
    writer.close()
    merge_index(root, FINGERPRINT, root / "store", [f"s{i}" for i in range(num_samples)])
    return root


def load_index(root: Path) -> dict:
    return json.loads((root / INDEX).read_text())


def save_index(root: Path, index: object) -> None:
    (root / INDEX).write_text(json.dumps(index))


def rewrite_shard_entries(path: Path, edit) -> None:
    """Rewrite a shard with its header's sample entries changed by ``edit(entries)`` (tampering)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    entries = json.loads(metadata["samples"])
    edit(entries)
    metadata["samples"] = json.dumps(entries)
    save_file(tensors, str(path), metadata=metadata)


def shard_paths(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("*.safetensors"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return make_cache(tmp_path / "cache")


def read_all(root: Path) -> list[SampleFeatures]:
    _, items = open_cache(root)
    return [items[i] for i in range(len(items))]


# --------------------------------------------------------------------------------------------------
# case 1: path containment
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "shards/../../outside.safetensors", "/tmp/outside.safetensors"])  # fmt: skip
def test_index_shard_outside_the_cache_is_refused(cache: Path, shard: str) -> None:
    (cache.parent / "outside.safetensors").write_bytes(
        cache.joinpath(load_index(cache)["shards"][0]["file"]).read_bytes()
    )
    index = load_index(cache)
    old = index["shards"][0]["file"]
    index["shards"][0]["file"] = shard
    for sample in index["samples"]:
        sample["shard"] = shard if sample["shard"] == old else sample["shard"]
    save_index(cache, index)
    with pytest.raises(FeatureCacheError, match=re.escape(repr(shard))):
        open_cache(cache)
    with pytest.raises(FeatureCacheError, match="shards\\[0\\] 'file'"):
        read_index(cache)


def test_shard_symlinked_out_of_the_cache_is_refused_never_read_or_moved(cache: Path) -> None:
    shard = shard_paths(cache)[0]
    outside = cache.parent / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(FeatureCacheError, match=f"{shard.name}.*outside"):
        open_cache(cache)
    with pytest.raises(FeatureCacheError, match=f"feature shard 'shards/{shard.name}'.*outside"):
        scan_shards(cache)  # stage I: neither read nor set aside
    assert shard.is_symlink() and outside.is_file()


def test_shards_folder_symlinked_out_of_the_cache_is_refused(cache: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (cache / "shards").rename(elsewhere)
    (cache / "shards").symlink_to(elsewhere)
    (elsewhere / "broken.safetensors").write_bytes(b"not a shard")  # scan_shards would rename it
    with pytest.raises(FeatureCacheError, match="shards folder"):
        scan_shards(cache)
    assert (elsewhere / "broken.safetensors").is_file()
    with pytest.raises(FeatureCacheError, match="outside"):
        open_cache(cache)


@pytest.mark.parametrize("key", ["../../../../../evil_latent", "/etc/passwd", "ab/../../x", "AB12", "", 5])
def test_latent_key_that_is_not_a_content_hash_is_refused(cache: Path, key) -> None:
    with pytest.raises(FeatureCacheError, match="not a content hash"):
        ContentStore(cache / "store").path("latents", key)
    rewrite_shard_entries(shard_paths(cache)[0], lambda entries: entries[0].update(latents=key))
    with pytest.raises(
        FeatureCacheError, match="sample entry 0 \\(sample s0\\): 'latents' must be a content key"
    ):
        read_all(cache)


def test_store_kind_and_store_folder_must_stay_put(cache: Path) -> None:
    with pytest.raises(FeatureCacheError, match="kind '../x'"):
        ContentStore(cache / "store").path("../x", "ab12")
    index = load_index(cache)
    index["store"] = "../store"
    save_index(cache, index)
    with pytest.raises(FeatureCacheError, match="'store' '../store' contains '..'"):
        open_cache(cache)


def test_a_store_file_symlinked_out_of_the_store_is_refused(cache: Path) -> None:
    store = ContentStore(cache / "store")
    key = load_index(cache)["samples"][1]["id"]
    entry = next(e for e in read_shard_entries(shard_paths(cache)[0]) if e["id"] == key)
    path = store.path("latents", entry["latents"])
    outside = cache.parent / "evil.safetensors"
    path.rename(outside)
    path.symlink_to(outside)
    with pytest.raises(FeatureCacheError, match="outside"):
        read_all(cache)


# --------------------------------------------------------------------------------------------------
# case 2: index.json validation
# --------------------------------------------------------------------------------------------------


def _drop(key: str):
    return lambda index: index.pop(key)


INDEX_DEFECTS = [
    ("a list", lambda index: [], "must be a JSON object, got \\[\\]"),
    ("no samples", _drop("samples"), "lacks 'samples'"),
    ("no store", _drop("store"), "lacks 'store'"),
    ("samples a dict", lambda index: index.update(samples={}), "'samples' must be a list"),
    ("sample a string", lambda index: index["samples"].__setitem__(0, "s0"), "samples\\[0\\] must be a JSON object"),
    ("id a number", lambda index: index["samples"][0].update(id=7), "samples\\[0\\]: 'id' must be a sample id"),
    ("size a string", lambda index: index["samples"][1].update(size="32x32"), "samples\\[1\\] \\(sample s1\\): 'size'"),
    ("size negative", lambda index: index["samples"][1].update(size=[32, -1]), "'size' must be \\[width, height\\]"),
    ("order a bool", lambda index: index["samples"][1].update(order=True), "'order' must be a row position"),
    ("complete a string", lambda index: index.update(complete="yes"), "'complete' must be true or false"),
    ("version a string", lambda index: index.update(format_version="2"), "'format_version' must be an integer"),
    ("version too new", lambda index: index.update(format_version=99), "format_version 99; upgrade"),
    ("unknown shard", lambda index: index["samples"][2].update(shard="shards/nope.safetensors"),
     "sample s2\\) names shard 'shards/nope.safetensors', which is not in 'shards'"),
    ("unknown sample id", lambda index: index["samples"][2].update(id="ghost"),
     "sample ghost\\) is not among the samples of shard"),
    ("duplicated sample", lambda index: index["samples"].append(dict(index["samples"][0])),
     "samples\\[3\\] \\(sample s0\\) repeats samples\\[0\\].*trained twice"),
    ("duplicated shard", lambda index: index["shards"].append(dict(index["shards"][0])), "is listed twice"),
    ("num_samples wrong", lambda index: index.update(num_samples=2), "'num_samples' must be the number of samples \\(3\\)"),
    ("shards a string", lambda index: index.update(shards="shards"), "'shards' must be a list"),
    ("shard samples not a list", lambda index: index["shards"][0].update(samples="s0"), "'samples' must be a list of sample ids"),
    ("skipped entry wrong", lambda index: index.update(skipped=[{"id": "x", "line": "3", "reason": ""}]),
     "'skipped'\\[0\\]: 'line' must be a metadata line"),
    ("fingerprint a list", lambda index: index.update(fingerprint=[]), "'fingerprint' must be an object"),
    ("shape with a string", lambda index: index["samples"][0]["shapes"].update(text=[3, "8"]), "'text' must be a text embeddings shape"),
    ("channels differ", lambda index: index["samples"][2]["shapes"].update(latents=[5, 2, 2]),
     "sample s2\\) has latents/edit channels \\[5\\] and text width 8, but the cache holds 4 channels and text width 8 \\(sample s0\\)"),
]  # fmt: skip


@pytest.mark.parametrize("name, mutate, message", INDEX_DEFECTS, ids=[d[0] for d in INDEX_DEFECTS])
def test_malformed_index_is_a_cache_error_naming_the_entry(cache: Path, name, mutate, message) -> None:
    index = load_index(cache)
    result = mutate(index)  # mutates in place; "a list" replaces the whole document
    save_index(cache, result if name == "a list" else index)
    with pytest.raises(FeatureCacheError, match=message) as error:
        read_index(cache)
    assert str(cache / INDEX) in str(error.value)
    with pytest.raises(FeatureCacheError, match=message):
        open_cache(cache)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"samples": [\xff\xfe]}', "is not UTF-8 text"),
        (b'{"format_version": 1,', "is not valid JSON"),
        (b'{"format_version": NaN}', "is not valid JSON.*NaN"),
        (b"[" * 100000 + b"]" * 100000, "is not valid JSON"),
    ],
    ids=["non-utf8", "truncated", "nan", "deep"],
)
def test_unreadable_index_names_the_file(cache: Path, content: bytes, message: str) -> None:
    (cache / INDEX).write_bytes(content)
    with pytest.raises(FeatureCacheError, match=message) as error:
        read_index(cache)
    assert str(cache / INDEX) in str(error.value)


def test_index_written_by_stage_one_is_valid_and_round_trips(cache: Path) -> None:
    index, items = open_cache(cache)
    assert check_index(load_index(cache), cache) == index
    assert [s.id for s in read_all(cache)] == ["s0", "s1", "s2"]
    assert items[0].edit_latents[0].shape == (CHANNELS, 3, 1)


def test_shard_header_is_validated_too(cache: Path) -> None:
    shard = shard_paths(cache)[0]
    rewrite_shard_entries(shard, lambda entries: entries[1].update(template={"tensor": "missing/0"}))
    with pytest.raises(FeatureCacheError, match="names tensor 'missing/0', which the shard lacks"):
        read_all(cache)
    rewrite_shard_entries(shard, lambda entries: entries[1].update(template={"oops": 1}))
    with pytest.raises(FeatureCacheError, match="'template' must be an object with one key"):
        read_all(cache)
    rewrite_shard_entries(shard, lambda entries: entries.__setitem__(1, dict(entries[0])))
    with pytest.raises(FeatureCacheError, match="holds sample s0 twice"):
        read_all(cache)


def test_sample_missing_from_its_shard_is_named(cache: Path) -> None:
    rewrite_shard_entries(shard_paths(cache)[0], lambda entries: entries.pop(1))
    _, items = open_cache(cache)
    with pytest.raises(FeatureCacheError, match="lists sample s1 in .*which does not hold it"):
        items[1]


def test_stage_one_merge_never_lists_a_sample_twice(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    # a second copy of a shard (e.g. restored from a backup): its samples are kept once
    first = shard_paths(root)[0]
    (first.parent / ("r999-copy-00000.safetensors")).write_bytes(first.read_bytes())
    index = merge_index(root, FINGERPRINT, root / "store", ["s0", "s1", "s2"])
    ids = [s["id"] for s in index["samples"]]
    assert sorted(ids) == ["s0", "s1", "s2"]
    assert read_index(root)["num_samples"] == 3


def test_garbage_skipped_file_is_named(cache: Path) -> None:
    (cache / "skipped" / "r000-bad.json").write_bytes(b'[{"id": 3}]')
    with pytest.raises(FeatureCacheError, match="r000-bad.json\\[0\\]: 'id' must be a sample id"):
        merge_index(cache, FINGERPRINT, cache / "store", ["s0", "s1", "s2"])


# --------------------------------------------------------------------------------------------------
# case 3: tensors read from the cache
# --------------------------------------------------------------------------------------------------


def _latents_path(root: Path, sample: int = 1) -> tuple[Path, str]:
    entry = next(e for path in shard_paths(root) for e in read_shard_entries(path) if e["id"] == f"s{sample}")
    return ContentStore(root / "store").path("latents", entry["latents"]), entry["latents"]


@pytest.mark.parametrize("record_shapes", [True, False], ids=["recorded", "old-cache"])
def test_integer_latents_are_an_error_naming_file_and_key(tmp_path: Path, record_shapes: bool) -> None:
    root = make_cache(tmp_path / "cache", record_shapes=record_shapes)
    path, key = _latents_path(root)
    save_file({"tensor": torch.ones(CHANNELS, 2, 2, dtype=torch.int64)}, str(path))
    with pytest.raises(FeatureCacheError, match=f"{re.escape(str(path))} \\(key {key}, latents of sample s1\\) holds torch.int64"):  # fmt: skip
        read_all(root)


@pytest.mark.parametrize(
    "shape, record_shapes",
    [
        ((CHANNELS + 1, 2, 2), True),
        ((CHANNELS, 4, 4), True),
        ((CHANNELS, 2, 2, 1), True),
        ((CHANNELS * 4,), False),
    ],
    ids=["channels", "spatial", "rank", "rank-old-cache"],
)
def test_wrong_shaped_latents_are_an_error_naming_the_file(
    tmp_path: Path, shape, record_shapes: bool
) -> None:
    root = make_cache(tmp_path / "cache", record_shapes=record_shapes)
    path, key = _latents_path(root)
    save_file({"tensor": torch.zeros(shape)}, str(path))
    with pytest.raises(
        FeatureCacheError, match=f"{re.escape(str(path))} .*has shape {re.escape(str(list(shape)))}"
    ):
        read_all(root)


def test_wrong_shaped_text_embeddings_are_an_error_naming_the_file(cache: Path) -> None:
    entry = read_shard_entries(shard_paths(cache)[0])[0]
    path = ContentStore(cache / "store").path("text", entry["text"])
    save_file({"tensor": torch.zeros(3, 9)}, str(path))
    with pytest.raises(FeatureCacheError, match=f"{re.escape(str(path))} .*text embeddings of sample s0.*expected \\[3, 8\\]"):  # fmt: skip
        read_all(cache)


def test_edit_latents_with_other_channels_are_named(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache", record_shapes=False)
    entry = read_shard_entries(shard_paths(root)[0])[0]
    save_file({"tensor": torch.zeros(CHANNELS + 2, 3, 1)}, str(ContentStore(root / "store").path("latents", entry["edit"][0])))  # fmt: skip
    with pytest.raises(FeatureCacheError, match="sample s0 .*edit latents of shapes \\[\\[6, 3, 1\\]\\] do not have the 4 channels"):  # fmt: skip
        read_all(root)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_latents_are_an_error_naming_file_and_sample(cache: Path, value: float) -> None:
    path, _ = _latents_path(cache, sample=2)
    latents = torch.zeros(CHANNELS, 2, 2)
    latents[1, 0, 1] = value
    save_file({"tensor": latents}, str(path))
    with pytest.raises(NonFiniteError, match=f"{re.escape(str(path))} .*latents of sample s2\\) holds NaN or inf") as error:  # fmt: skip
        read_all(cache)
    assert isinstance(error.value, FeatureCacheError)


# --------------------------------------------------------------------------------------------------
# case 4: writing the cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["cwd", "cwd-parent", "home", "root"])
def test_cache_root_is_never_a_protected_folder(tmp_path: Path, monkeypatch, where: str) -> None:
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = {"cwd": Path("."), "cwd-parent": work.parent.parent, "home": Path("~").expanduser(), "root": Path("/")}[where]  # fmt: skip
    with pytest.raises(UnsafeOutputError, match="refusing to write feature cache folder"):
        write_initial_index(root, FINGERPRINT, root / "store")
    with pytest.raises(UnsafeOutputError):
        scan_shards(root)
    assert (work / "notes.txt").read_text() == "mine" and not (work / INDEX).exists()


def test_cache_in_a_foreign_non_empty_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "skipped").mkdir(parents=True)
    (folder / "skipped" / "keep.json").write_text("[]")
    with pytest.raises(FeatureCacheError, match="is not empty and holds no feature cache"):
        write_initial_index(folder, FINGERPRINT, folder / "store")
    assert sorted(p.name for p in folder.rglob("*")) == ["keep.json", "skipped"]


def test_a_new_cache_carries_the_write_safety_marker(cache: Path) -> None:
    assert is_ours(cache)
    # a rerun into the same (ours) folder is allowed: stage I is incremental
    write_initial_index(cache, FINGERPRINT, cache / "store")


def test_a_bad_shard_is_set_aside_inside_the_cache(cache: Path) -> None:
    shard = shard_paths(cache)[0]
    shard.write_bytes(b"truncated")
    before = set(cache.parent.iterdir())
    assert len(scan_shards(cache)) == 1
    assert (shard.parent / (shard.name + ".corrupt")).is_file() and set(cache.parent.iterdir()) == before


def test_clearing_leftovers_touches_only_cache_files_inside_the_cache(cache: Path, tmp_path: Path) -> None:
    (cache / "shards" / ".r000-dead-00001.safetensors.tmp-7").write_bytes(b"half")
    (cache / "skipped" / "r000-old.json").write_text("[]")
    assert len(clear_leftovers(cache)) == 2
    assert not list((cache / "shards").glob(".*")) and not list((cache / "skipped").iterdir())
    # a skipped folder that is a symlink to the user's files is refused before anything is removed
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.json").write_text("{}")
    (cache / "skipped").rmdir()
    (cache / "skipped").symlink_to(mine)
    with pytest.raises(FeatureCacheError, match="skipped folder.*outside"):
        clear_leftovers(cache)
    assert (mine / "keep.json").is_file()
    # and a folder that is not a cache is not touched at all
    (mine / "skipped").mkdir()
    (mine / "skipped" / "notes.json").write_text("{}")
    with pytest.raises(FeatureCacheError, match="not a feature cache"):
        clear_leftovers(mine)
    assert (mine / "skipped" / "notes.json").is_file()


def test_stage_one_refuses_the_current_directory_as_cache(base_model, dataset, tmp_path, monkeypatch) -> None:
    from diffsynth_templates.training.config import parse_args
    from diffsynth_templates.training.trainer import run
    from tests.training.helpers import MASKED_KV, SMALL

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)

    def stage_one(cache_path: str) -> None:
        args = ["--task", "data_process", "--model", base_model, "--dataset_metadata_path", dataset,
                "--cache_path", cache_path, *SMALL, *MASKED_KV]  # fmt: skip
        run(parse_args([str(a) for a in args]))

    with pytest.raises(UnsafeOutputError, match="current directory"):
        stage_one(".")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    # a folder of the user's own files (not the current one) is refused before anything is written there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeatureCacheError, match="not empty and holds no feature cache"):
        stage_one(str(work))
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------------------------
# case 6: fuzzing index.json
# --------------------------------------------------------------------------------------------------


def _paths(value, prefix=()):
    """Every (container, key) path in a JSON tree."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


REPLACEMENTS = [None, True, 0, -1, 1.5, 2**70, -(2**70), "", "x", "../x", "/etc/passwd", "shards/../../x",
                "s0", "s1", [], [1], {}, {"tensor": "x"}, [32, 32], [0, 32], float("nan"), float("inf")]  # fmt: skip


def _mutate(index, rng: random.Random):
    paths = list(_paths(index))
    path = rng.choice(paths)
    if not path:
        return copy.deepcopy(rng.choice(REPLACEMENTS + [[index], "index"]))
    *parent_keys, key = path
    parent = index
    for k in parent_keys:
        parent = parent[k]
    action = rng.random()
    if action < 0.3 and isinstance(parent, dict):
        del parent[key]
    elif action < 0.4 and isinstance(parent, list):
        parent.append(parent[key])  # duplicate an entry
    elif action < 0.5 and isinstance(parent, dict):
        parent[f"{key}_"] = parent.pop(key)  # a misspelled key
    else:
        parent[key] = copy.deepcopy(rng.choice(REPLACEMENTS))  # fresh: later mutations must not alias
    return index


def _encode(index, rng: random.Random) -> bytes:
    data = json.dumps(index).encode()
    roll = rng.random()
    if roll < 0.08:
        return data[: rng.randrange(len(data))]  # truncated
    if roll < 0.14:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0x00])]) + data[i + 1 :]  # non-UTF-8, NUL
    return data


def test_fuzzed_index_gives_only_our_errors(cache: Path) -> None:
    rng = random.Random(20)
    valid = (cache / INDEX).read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        index = json.loads(valid)
        for _ in range(rng.choice([1, 1, 2, 3])):
            index = _mutate(index, rng)
        (cache / INDEX).write_bytes(_encode(index, rng))
        try:
            read_index(cache)
            _, items = open_cache(cache)
            for i in range(len(items)):
                items[i]
        except DiffSynthTemplatesError:
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
    assert outcomes["error"] > 200 and outcomes["ok"] > 0, outcomes


def test_fuzzed_shard_headers_give_only_our_errors(cache: Path) -> None:
    rng = random.Random(21)
    shard = shard_paths(cache)[0]
    valid = shard.read_bytes()
    outcomes = {"ok": 0, "error": 0}

    def mutate(entries: list) -> None:
        mutated = _mutate(entries, rng)
        if mutated is not entries:  # the whole list was replaced
            entries[:] = mutated if isinstance(mutated, list) else [mutated]

    for _ in range(100):
        shard.write_bytes(valid)
        rewrite_shard_entries(shard, mutate)
        try:
            _, items = open_cache(cache)
            for i in range(len(items)):
                items[i]
        except DiffSynthTemplatesError:
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
    assert outcomes["error"] > 50, outcomes
