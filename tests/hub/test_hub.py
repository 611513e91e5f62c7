"""hub: packaging + model cards, upload through the modelscope SDK to a local fake ModelScope, offline
downloads, sha256 pins, DiffSynth-format conversion. No test touches the real network."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth_templates.__main__ import main
from diffsynth_templates.hub import convert
from diffsynth_templates.hub.card import CardContext, read_front_matter, read_input_table, render_model_card
from diffsynth_templates.hub.convert import ConversionError, convert_diffsynth_folder, value_kv_rule
from diffsynth_templates.hub.package import package_template, verify_package
from diffsynth_templates.hub.upload import (
    HubAuthError,
    HubUnreachableError,
    InvalidRepoIdError,
    MissingTokenError,
    UploadInterruptedError,
    upload_package,
    validate_repo_id,
)
from diffsynth_templates.loading.integrity import IntegrityError, verify_sha256
from diffsynth_templates.loading.resolve import ModelNotFoundError
from diffsynth_templates.pipelines.random_init import random_flux2_pipeline
from diffsynth_templates.templates import InputField, InputSchema, TemplatePipeline, TemplateSpec
from diffsynth_templates.templates.folder import load_template_folder
from diffsynth_templates.templates.residency import HostStore
from tests.templates.helpers import ScalarKV, ScalarKVConfig, save_declarative, write_diffsynth_folder

TOKEN = "ms-test-token"
REPO = "alice/scalar-kv"
CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, cfg_scale=1.0)
CALL.update(output_type="np", progress=False, max_sequence_length=32)


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return random_flux2_pipeline()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """What the trainer leaves: RUN/checkpoint-100 (a declarative folder + training_args.json) and
    RUN/validation/step-N.png."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    model = ScalarKV(ScalarKVConfig(block_names=("single_0", "double_0")))
    folder = save_declarative(run / "checkpoint-100", model)
    args = {"learning_rate": 1e-4, "max_steps": 300, "dataset_base_path": "/home/alice/data"}
    (folder / "training_args.json").write_text(json.dumps(args))
    (run / "validation").mkdir()
    for step in (20, 100, 300):  # step 300 comes after this checkpoint
        Image.new("RGB", (16, 16), (step % 256,) * 3).save(run / "validation" / f"step-{step}.png")
    return folder


@pytest.fixture(scope="module")
def package(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "scalar-kv"
    return package_template(checkpoint, out, repo_id=REPO, base_model="toy/flux2-tiny", description="Test.")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256: "the package is intact"."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def published(files: dict[str, str]) -> dict[str, str]:
    """The part of a snapshot that is uploaded: hidden files (the write-safety marker) stay local."""
    return {k: v for k, v in files.items() if not any(part.startswith(".") for part in k.split("/"))}


def generate(sources, pipe, **kw) -> np.ndarray:
    tp = TemplatePipeline.from_pretrained(
        [str(s) for s in sources], device="cpu", host_store=HostStore(), **kw
    )
    return tp(pipe, template_inputs=[{"model_id": 0, "scale": 0.7}], **CALL)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def fast_sdk_retries(monkeypatch):
    """The SDK retries a failed blob upload 5 times with backoff, then runs recovery rounds: keep one try."""
    import modelscope_hub._upload as sdk_upload

    monkeypatch.setattr(sdk_upload, "UPLOAD_BLOB_MAX_ATTEMPTS", 1)
    monkeypatch.setattr(sdk_upload, "UPLOAD_RECOVERY_ENABLED", False)
    monkeypatch.setattr(sdk_upload, "UPLOAD_FAILED_FILE_MAX_RETRY_ROUNDS", 0)


# --- a local ModelScope -----------------------------------------------------------------------------


class FakeModelScope:
    """The endpoints the modelscope SDK (modelscope_hub 0.5) calls to create a model repo and upload a folder."""

    def __init__(self, token: str = TOKEN, username: str = "alice"):
        self.token, self.username = token, username
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization header)
        self.repos: dict[str, dict] = {}
        self.commits: list[tuple[str, list[str]]] = []
        self.blobs: dict[str, bytes] = {}
        self.fail_blob_put = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self, method: str) -> None:
                path = urlparse(self.path).path
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                server.requests.append((method, path, auth))
                status, obj = server.route(method, path, body, auth)
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            def do_HEAD(self):
                self.handle_one("HEAD")

            def do_GET(self):
                self.handle_one("GET")

            def do_POST(self):
                self.handle_one("POST")

            def do_PUT(self):
                self.handle_one("PUT")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(self, method: str, path: str, body: bytes, auth: str) -> tuple[int, dict]:
        p = path.strip("/").split("/")
        if method == "HEAD" and path == "/":
            return 200, {}
        if auth != f"Bearer {self.token}":
            return 401, {"Code": 10010205001, "Success": False, "success": False, "Message": "invalid token"}
        if path == "/openapi/v1/users/me":
            return 200, {"success": True, "data": {"username": self.username, "email": "alice@example.com"}}
        if method == "GET" and p[:3] in (["openapi", "v1", "models"], ["api", "v1", "models"]):
            repo = "/".join(p[3:5])
            if repo in self.repos:
                return 200, {"Code": 200, "Success": True, "success": True, "data": {"id": repo}, "Data": {"Path": p[3], "Name": p[4]}}  # fmt: skip
            return 404, {"Code": 404, "Success": False, "success": False, "Message": "model not found"}
        if method == "POST" and path == "/api/v1/models":
            req = json.loads(body)
            repo = f"{req['Path']}/{req['Name']}"
            if repo in self.repos:
                return 400, {"Code": 400, "Success": False, "Message": "model already exists"}
            self.repos[repo] = {"visibility": req["Visibility"], "license": req.get("License"), "files": {}}
            return 200, {"Code": 200, "Success": True, "Data": {"Path": req["Path"], "Name": req["Name"]}}
        if method == "POST" and p[:4] == ["api", "v1", "repos", "models"] and p[6:] == ["info", "lfs", "objects", "batch"]:  # fmt: skip
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"{self.url}/lfs/{o['oid']}"}},
                }
                for o in json.loads(body)["objects"]
                if o["oid"] not in self.blobs
            ]
            return 200, {"Code": 200, "Success": True, "Data": {"objects": objects}}
        if method == "PUT" and p[0] == "lfs":
            if self.fail_blob_put:
                return 500, {"Code": 500, "Message": "internal error"}
            if hashlib.sha256(body).hexdigest() != p[1]:
                return 400, {"Code": 400, "Message": "sha256 mismatch"}
            self.blobs[p[1]] = body
            return 200, {"Code": 200}
        if method == "POST" and p[:4] == ["api", "v1", "repos", "models"] and p[6:7] == ["commit"]:
            repo = "/".join(p[4:6])
            actions = json.loads(body)["actions"]
            for a in actions:
                data = self.blobs[a["sha256"]] if a["type"] == "lfs" else base64.b64decode(a["content"])
                assert len(data) == a["size"]
                self.repos[repo]["files"][a["path"]] = data
            self.commits.append((repo, sorted(a["path"] for a in actions)))
            return 200, {"Code": 200, "Success": True, "Data": {"CommitId": f"c{len(self.commits)}"}}
        return 404, {"Code": 404, "Message": f"no route for {method} {path}"}


@pytest.fixture
def hub():
    server = FakeModelScope()
    yield server
    server.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- packaging, model card, dry run ----------------------------------------------------------------


def test_publish_dry_run_builds_a_package_that_loads_and_generates(checkpoint, pipe, tmp_path, capsys):
    out = tmp_path / "package"
    assert main(["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(out), "--base_model", "toy/flux2-tiny"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "dry run: would upload" in printed and "generated: [1, 32, 32, 3] finite" in printed
    for name, path in [("model.safetensors", out / "model.safetensors"), ("README.md", out / "README.md")]:
        assert name in printed and path.is_file()

    spec = json.loads((out / "template.json").read_text())
    assert (
        spec["name"] == "scalar-kv"
        and spec["base_model"] == "toy/flux2-tiny"
        and spec["license"] == "apache-2.0"
    )
    assert verify_sha256(out) == spec["sha256"] and set(spec["sha256"]) == {"model.safetensors"}
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-100.png", "step-20.png"]

    # loads with TemplatePipeline, no code involved, and does what the checkpoint does
    image = generate([out], pipe)
    assert np.isfinite(image).all()
    assert np.array_equal(image, generate([checkpoint], pipe))
    assert np.abs(image - pipe(**CALL)).max() > 0  # the template changes the image

    # --dtype bfloat16 stores half-size weights that load and generate like the fp32 ones (within rounding)
    half = tmp_path / "package-bf16"
    assert main(["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(half), "--dtype", "bfloat16"]) == 0  # fmt: skip
    stored = load_file(str(half / "model.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.bfloat16}
    assert (half / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    assert verify_sha256(half) == json.loads((half / "template.json").read_text())["sha256"]
    assert np.abs(generate([half], pipe) - image).max() < 0.05

    # the card's table describes the schema the template validates inputs against
    card = (out / "README.md").read_text()
    rows = read_input_table(card)
    schema = ScalarKV.input_schema
    assert [r["name"] for r in rows] == [f.name for f in schema.fields] == ["scale"]
    assert rows[0]["type"] == "float" and rows[0]["range"] == "[0.0, 1.0]"
    assert rows[0]["default"] == "required" and rows[0]["description"] == "strength"
    meta = read_front_matter(card)
    assert meta["library_name"] == "diffsynth-templates" and meta["base_model"] == ["toy/flux2-tiny"]
    assert meta["license"] == "apache-2.0" and meta["frameworks"] == ["Pytorch"] and meta["tasks"]
    assert "--template alice/scalar-kv --template_input 'model_id=0 scale=0.5'" in card.replace(
        "\\\n    ", ""
    )
    assert 'TemplatePipeline.from_pretrained(["alice/scalar-kv"]' in card and '"scale": 0.5' in card
    assert "| `learning_rate` | 0.0001 |" in card and "![step-100](samples/step-100.png)" in card
    assert "| `dataset_base_path` | (local path) |" in card and "/home/alice" not in card


def test_card_table_round_trips_every_field_kind():
    schema = InputSchema(
        [
            InputField("scale", "float", minimum=-1.0, maximum=2.5, description="how | much"),
            InputField("steps", "int", minimum=1, description="count"),
            InputField("image", "image", description="edge map"),
            InputField("weight", "float", required=False, default=0.8),
            InputField("tag", "str", required=False),
        ]
    )
    spec = TemplateSpec("test_scalar_kv", inputs=schema.to_json(), cache_keys=["kv_cache", "lora"])
    card = render_model_card(CardContext("bob/t", spec, schema))
    rows = {r["name"]: r for r in read_input_table(card)}
    assert list(rows) == ["scale", "steps", "image", "weight", "tag"]
    assert rows["scale"] == {"name": "scale", "type": "float", "range": "[-1.0, 2.5]", "default": "required", "description": "how | much"}  # fmt: skip
    assert rows["steps"]["range"] == ">= 1" and rows["steps"]["type"] == "int"
    assert rows["image"]["range"] == "—" and rows["image"]["default"] == "required"
    assert rows["weight"]["default"] == "0.8" and rows["tag"]["default"] == "—"
    assert 'Image.open("image.png")' in card.replace("'", '"') and "image=image.png" in card
    assert "base_model" not in read_front_matter(card)  # not recorded: not invented


def test_package_shards_weights_and_records_hashes(checkpoint, pipe, tmp_path):
    out = package_template(checkpoint, tmp_path / "sharded", repo_id=REPO, shard_size=4096)
    spec = json.loads((out / "template.json").read_text())
    assert len(spec["weights"]) > 1 and spec["weights"][0].endswith(
        f"-of-{len(spec['weights']):05d}.safetensors"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(spec["weights"]) == set(spec["sha256"])
    reference = load_template_folder(checkpoint).model.state_dict()
    loaded = load_template_folder(out).model.state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)
    verify_sha256(out)

    # packaging again replaces the old package when asked to; a non-package folder is never overwritten
    with pytest.raises(Exception, match="already exists; pass --overwrite"):
        package_template(checkpoint, out, repo_id=REPO)
    package_template(checkpoint, out, repo_id=REPO, overwrite=True)
    assert json.loads((out / "template.json").read_text())["weights"] == ["model.safetensors"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="refusing to replace"):
        package_template(checkpoint, tmp_path / "precious", repo_id=REPO, overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_verify_package_reports_tampered_weights(package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors: sha256 .* download it again"):
        verify_sha256(broken)
    with pytest.raises(Exception, match="integrity check"):
        verify_package(broken)


def test_verify_skips_generation_only_for_templates_bigger_than_the_tiny_base(pipe, tmp_path):
    from diffsynth_templates.templates.folder import save_template_folder
    from diffsynth_templates.templates.zoo import ValueKV, ValueKVConfig, template_spec

    wide = ValueKV(ValueKVConfig(block_names=("single_0",), dim=64, num_heads=4, length=2))  # base: 2 x 16
    ckpt = save_template_folder(tmp_path / "wide", wide, template_spec(wide))
    package = package_template(ckpt, tmp_path / "package", repo_id="alice/wide")
    report = verify_package(package)
    assert not report["generated"] and "verify with the real base" in report["generation_skipped"]
    assert report["cache"]["kv_cache.single_0[0]"] == [1, 2, 4, 16]  # the cache itself was computed
    with pytest.raises(Exception, match="does not fit the base pipeline"):
        verify_package(package, pipe)  # a base the user chose must fit


# --- upload through the SDK to the local server ----------------------------------------------------


def test_upload_creates_repo_and_uploads_every_file(hub, package):
    before = snapshot(package)
    result = upload_package(package, REPO, token=TOKEN, private=True, endpoint=hub.url, progress=False)

    assert result.created and result.private and result.url == f"{hub.url}/models/{REPO}"
    assert hub.repos[REPO]["visibility"] == 1 and hub.repos[REPO]["license"] == "apache-2.0"  # 1: private
    uploaded = hub.repos[REPO]["files"]
    assert {k: len(v) for k, v in uploaded.items()} == dict(result.files)
    assert {k: hashlib.sha256(v).hexdigest() for k, v in uploaded.items()} == published(before)
    assert set(uploaded) >= {"template.json", "README.md", "model.safetensors", "samples/step-20.png"}
    # weights land before the files that make the folder a template
    (_, first), (_, last) = hub.commits
    assert "model.safetensors" in first and "template.json" not in first
    assert last == ["README.md", "configuration.json", "template.json"]
    # the token went with every API call; the package was not touched and no resume state is left
    api_calls = [r for r in hub.requests if r[0] != "HEAD"]
    assert api_calls and all(auth == f"Bearer {TOKEN}" for _, _, auth in api_calls)
    assert ("POST", "/api/v1/models", f"Bearer {TOKEN}") in hub.requests
    assert snapshot(package) == before
    assert not list(package.parent.glob(".*upload*"))

    upload_package(package, "alice/public-one", token=TOKEN, private=False, endpoint=hub.url, progress=False)
    assert hub.repos["alice/public-one"]["visibility"] == 5  # 5: public


def test_publish_cli_uploads_with_token_from_env(checkpoint, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", TOKEN)
    out = tmp_path / "pkg"
    argv = [
        "publish",
        str(checkpoint),
        "--repo",
        "alice/cli",
        "--public",
        "--endpoint",
        hub.url,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    files = published(snapshot(out))
    assert f"uploaded {len(files)} file(s) to {hub.url}/models/alice/cli" in capsys.readouterr().out
    assert hub.repos["alice/cli"]["visibility"] == 5
    assert {k: hashlib.sha256(v).hexdigest() for k, v in hub.repos["alice/cli"]["files"].items()} == files


def test_interrupted_upload_leaves_package_intact_and_can_be_retried(hub, package, fast_sdk_retries):
    before = snapshot(package)
    hub.fail_blob_put = True  # the server fails after the repo exists and small files are committed
    with pytest.raises(UploadInterruptedError, match="is intact; run the same command again"):
        upload_package(package, REPO, token=TOKEN, endpoint=hub.url, progress=False)
    assert snapshot(package) == before
    assert "model.safetensors" not in hub.repos[REPO]["files"]
    assert "template.json" not in hub.repos[REPO]["files"]  # never a template without its weights

    hub.fail_blob_put = False
    commits_before = len(hub.commits)
    result = upload_package(package, REPO, token=TOKEN, endpoint=hub.url, progress=False)
    assert not result.created
    assert {k: hashlib.sha256(v).hexdigest() for k, v in hub.repos[REPO]["files"].items()} == published(
        before
    )
    assert hub.commits[commits_before][1] == ["model.safetensors"]  # what was committed is not sent again
    assert snapshot(package) == before


def test_upload_errors_say_what_to_do(hub, package, monkeypatch, tmp_path):
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    with pytest.raises(
        MissingTokenError, match="MODELSCOPE_API_TOKEN.*myaccesstoken|myaccesstoken.*MODELSCOPE_API_TOKEN"
    ):
        upload_package(package, REPO, endpoint=hub.url)
    with pytest.raises(HubAuthError, match="rejected the token"):
        upload_package(package, REPO, token="ms-wrong", endpoint=hub.url)
    with pytest.raises(HubUnreachableError, match="cannot reach ModelScope.*ready to upload"):
        upload_package(package, REPO, token=TOKEN, endpoint=closed_port_url())
    assert hub.repos == {}

    # the CLI checks the token before packaging anything
    out = tmp_path / "never"
    assert main(["publish", str(package), "--repo", REPO, "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "-bad/name", "alice/na me", "alice/", "alice/name.", "al..ice/x", "alice/名字"])  # fmt: skip
def test_invalid_repo_ids_are_refused(repo, package, capsys):
    with pytest.raises(InvalidRepoIdError, match="expected OWNER/NAME"):
        validate_repo_id(repo)
    assert main(["publish", str(package), f"--repo={repo}", "--dry-run"]) == 2
    assert "expected OWNER/NAME" in capsys.readouterr().err


# --- downloads: offline mode and the cache ---------------------------------------------------------


def test_offline_mode_fails_clearly_then_loads_from_a_populated_cache(package, pipe, tmp_path, monkeypatch, no_network):  # fmt: skip
    monkeypatch.setenv("DIFFSYNTH_TEMPLATES_OFFLINE", "1")
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match="not in the local cache .* offline mode is on"):
        generate([REPO], pipe, cache_dir=cache)

    # the modelscope cache layout: {cache}/models/{owner}--{name}/snapshots/{revision}/
    snapshots = cache / "models" / REPO.replace("/", "--") / "snapshots"
    shutil.copytree(package, snapshots / "master")
    image = generate([REPO], pipe, cache_dir=cache)
    assert np.array_equal(image, generate([package], pipe))
    verify_sha256(snapshots / "master")

    # a pinned revision is its own snapshot; a revision not in the cache is an error, not a fallback
    shutil.copytree(package, snapshots / "v1")
    assert np.array_equal(generate([REPO], pipe, cache_dir=cache, revision="v1"), image)
    with pytest.raises(ModelNotFoundError, match="offline mode"):
        generate([REPO], pipe, cache_dir=cache, revision="v2")


# --- conversion of DiffSynth-format folders -------------------------------------------------------

# A DiffSynth-format value template written the way DiffSynth-Studio's Brightness example is laid out.
VALUE_MODEL_PY = """
import math, os
import torch

open(os.path.join(os.path.dirname(__file__), "EXECUTED"), "w").close()  # proves whether this file ran


class Encoder(torch.nn.Module):
    def __init__(self, dim_in=256, dim_out=64, length=8):
        super().__init__()
        self.length = length
        self.prefer_value_embedder = torch.nn.Sequential(
            torch.nn.Linear(dim_in, dim_out), torch.nn.SiLU(), torch.nn.Linear(dim_out, dim_out)
        )
        self.positional_embedding = torch.nn.Parameter(torch.randn(length, dim_out))

    def forward(self, value, dtype):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        angles = (value * 1000)[:, None].float() * freqs[None, :]
        emb = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
        emb = self.prefer_value_embedder(emb).squeeze(0)
        return emb.expand(self.length, -1) + self.positional_embedding.to(dtype)


class ValueModel(torch.nn.Module):
    def __init__(self, num_double_blocks=1, num_single_blocks=2, dim=32, num_heads=2, length=4):
        super().__init__()
        self.block_names = [f"double_{i}" for i in range(num_double_blocks)]
        self.block_names += [f"single_{i}" for i in range(num_single_blocks)]
        self.proj_k = torch.nn.ModuleDict({b: Encoder(dim_out=dim, length=length) for b in self.block_names})
        self.proj_v = torch.nn.ModuleDict({b: Encoder(dim_out=dim, length=length) for b in self.block_names})
        self.num_heads, self.length = num_heads, length

    @torch.no_grad()
    def process_inputs(self, pipe, scale, **kwargs):
        return {"value": torch.tensor([scale], dtype=pipe.torch_dtype, device=pipe.device)}

    def forward(self, value, **kwargs):
        kv = {}
        for b in self.block_names:
            k = self.proj_k[b](value, value.dtype).view(1, self.length, self.num_heads, -1)
            v = self.proj_v[b](value, value.dtype).view(1, self.length, self.num_heads, -1)
            kv[b] = (k, v)
        return {"kv_cache": kv}


class Annotator:
    def __call__(self, image, **kwargs):
        return {"scale": 0.5}


TEMPLATE_MODEL = ValueModel
TEMPLATE_MODEL_PATH = "model.safetensors" if "model.safetensors" in os.listdir(os.path.dirname(__file__)) else None
TEMPLATE_DATA_PROCESSOR = Annotator
"""


def write_value_folder(folder: Path, seed: int = 0, model_py: str = VALUE_MODEL_PY) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(model_py)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for side in "kv":
        for block in ("double_0", "single_0", "single_1"):
            p = f"proj_{side}.{block}"
            shapes = {".0.weight": (32, 256), ".0.bias": (32,), ".2.weight": (32, 32), ".2.bias": (32,)}
            weights |= {
                f"{p}.prefer_value_embedder{k}": torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()
            }
            weights[f"{p}.positional_embedding"] = torch.randn(4, 32, generator=g)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def same_caches(src: Path, dst: Path, pipe) -> None:
    original = load_template_folder(src, trust_remote_code=True).model
    converted = load_template_folder(dst).model
    for scale in (0.0, 0.25, 0.7, 1.0):
        a = original(**original.process_inputs(pipe=pipe, scale=scale))["kv_cache"]
        b = converted(**converted.process_inputs(pipe=pipe, scale=scale))["kv_cache"]
        assert a.keys() == b.keys()
        for block in a:
            assert torch.equal(a[block][0], b[block][0]) and torch.equal(a[block][1], b[block][1]), block


def test_convert_value_template_without_running_it(pipe, tmp_path, capsys):
    src = write_value_folder(tmp_path / "brightness")
    dst = tmp_path / "brightness-declarative"
    assert main(["convert", str(src), "--out", str(dst)]) == 0
    assert "architecture value_kv" in capsys.readouterr().out
    assert not (src / "EXECUTED").exists()  # model.py was read, never run

    spec = json.loads((dst / "template.json").read_text())
    assert spec["architecture"] == "value_kv" and not (dst / "model.py").exists()
    assert spec["config"]["num_heads"] == 2 and spec["config"]["block_names"] == [
        "double_0",
        "single_0",
        "single_1",
    ]
    assert spec["config"]["values"] == ["scale"] and spec["config"]["length"] == 4
    assert spec["converted_from"]["data_processor_class"] == "Annotator"
    verify_sha256(dst)

    same_caches(src, dst, pipe)  # bit for bit
    images = [generate([dst], pipe), generate([src], pipe, trust_remote_code=True)]
    assert np.array_equal(*images)

    # and the converted folder publishes like any checkpoint (value_kv's schema comes from its config)
    package = package_template(dst, tmp_path / "package", repo_id="alice/brightness")
    report = verify_package(package, pipe)
    assert report["generated"] and report["inputs"] == {"scale": 0.5}
    assert [r["name"] for r in read_input_table((package / "README.md").read_text())] == ["scale"]


def test_conversion_table_takes_new_layouts(pipe, tmp_path, monkeypatch):
    """The test helpers' DiffSynth template names its MLP ``embedder`` and embeds with 16 channels:
    one more table entry (with a key rename) converts it to value_kv."""
    src = write_diffsynth_folder(tmp_path / "scalar", pipe.dit)
    with pytest.raises(ConversionError, match="(?s)Supported layouts.*trust_remote_code=True"):
        convert_diffsynth_folder(src, tmp_path / "unknown")
    monkeypatch.setattr(convert, "LAYOUT_RULES", [*convert.LAYOUT_RULES, value_kv_rule(embedder="embedder")])
    dst = convert_diffsynth_folder(src, tmp_path / "scalar-declarative")
    assert json.loads((dst / "template.json").read_text())["config"]["embed_dim"] == 16
    same_caches(src, dst, pipe)


def test_convert_errors(tmp_path, capsys):
    src = tmp_path / "odd"
    src.mkdir()
    (src / "model.py").write_text("TEMPLATE_MODEL = None\n")
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(src / "model.safetensors"))
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "match no known DiffSynth layout" in err and "value_kv" in err and "trust_remote_code=True" in err

    no_heads = VALUE_MODEL_PY.replace("num_heads=2", "num_heads=None")
    src = write_value_folder(tmp_path / "no-heads", model_py=no_heads)
    with pytest.raises(ConversionError, match="number of attention heads .* TEMPLATE_MODEL_CONFIG"):
        convert_diffsynth_folder(src, tmp_path / "out2")
    with pytest.raises(ConversionError, match="unknown architecture"):
        convert_diffsynth_folder(src, tmp_path / "out3", architecture="nope")
