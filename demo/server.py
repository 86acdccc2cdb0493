"""Run the real ComfyUI server (the unpacked 0.3.75 host) as a subprocess with LoRA Core installed, and talk
to it over HTTP on the loopback interface.

Nothing inside .host/ComfyUI is modified: the server gets its own *base directory* (`--base-directory`),
which holds `custom_nodes/comfyui-lora-core -> <this repo>` (a symlink: the pack is loaded exactly as a user
install would load it), `models -> <models folder>` (tiny checkpoint, LoRAs), `input/`, `user/`, and the
`--output-directory` where SaveImage writes.

    with ComfyServer(base_dir, models_dir).start() as server:
        prompt_id = server.post_prompt(api_graph)
        entry = server.wait_history(prompt_id, timeout=120)
        images = server.output_images(entry)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from demo.host import REPO, require_host

PACK_LINK_NAME = "comfyui-lora-core"
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """The server did not start, died, rejected a prompt, or a prompt failed while executing."""


class PromptRejected(ServerError):
    """POST /prompt answered 400: the graph did not validate. `node_errors` is ComfyUI's per-node detail."""

    def __init__(self, message: str, error: dict, node_errors: dict):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _link(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (replacing a stale link; never deleting a real folder)."""
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        raise ServerError(f"{link} exists and is not a symlink; remove it or choose another base directory.")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


def prepare_base_dir(base_dir: Path, models_dir: Path, pack_dir: Path = REPO) -> Path:
    """Lay out a ComfyUI base directory: the pack linked into custom_nodes/, models/ linked to `models_dir`,
    empty input/ output/ user/ temp/. The training folder (models/training/*) is linked into input/ too, so
    nodes that read folders from ComfyUI's input directory find it."""
    base_dir = Path(base_dir).resolve()
    models_dir = Path(models_dir).resolve()
    for sub in ("custom_nodes", "input", "output", "user", "temp"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    _link(base_dir / "custom_nodes" / PACK_LINK_NAME, Path(pack_dir).resolve())
    if base_dir / "models" != models_dir:
        _link(base_dir / "models", models_dir)
    training = models_dir / "training"
    if training.is_dir():
        for dataset in sorted(p for p in training.iterdir() if p.is_dir()):
            _link(base_dir / "input" / dataset.name, dataset.resolve())
    return base_dir


class ComfyServer:
    """One ComfyUI server process on 127.0.0.1:<port>. Use as a context manager or call start()/stop()."""

    def __init__(self, base_dir: Path | str, models_dir: Path | str, port: int | None = None,
                 output_dir: Path | str | None = None, extra_args: list[str] | None = None,
                 python: str | None = None):
        self.base_dir = Path(base_dir).resolve()
        self.models_dir = Path(models_dir).resolve()
        self.port = port or free_port()
        self.output_dir = Path(output_dir).resolve() if output_dir else self.base_dir / "output"
        self.extra_args = list(extra_args or [])
        self.python = python or sys.executable
        self.log_path = self.base_dir / "comfyui-server.log"
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # ----------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", LOOPBACK, "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", str(self.base_dir),
                "--output-directory", str(self.output_dir),
                # The default database path is inside the host folder; keep the host untouched.
                "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}", *self.extra_args]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        """Start main.py and wait until /object_info answers; raise ServerError with the log tail if not."""
        host = require_host()
        prepare_base_dir(self.base_dir, self.models_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Everything runs offline on loopback: no hub look-ups, no telemetry, unbuffered logs for the tail.
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.pop("PYTHONPATH", None)
        self._log_file = open(self.log_path, "wb")  # fresh log: pack_import_error reads this run only
        self.process = subprocess.Popen(self.command(), cwd=str(host), env=env, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("while starting")
            try:
                self._request("GET", "/system_stats", timeout=2)
                self.object_info()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s.\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server process we started (SIGINT, then SIGTERM, then SIGKILL to its own group)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)  # its own session: only the server and its children
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return f"--- last lines of {self.log_path} ---\n{text[-chars:]}"

    def pack_import_error(self) -> str | None:
        """The traceback ComfyUI logged if LoRA Core failed to import (None when it loaded)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        marker = f"Cannot import {self.base_dir / 'custom_nodes' / PACK_LINK_NAME} module for custom nodes"
        end = text.rfind(marker)
        if end < 0:
            return None
        start = text.rfind("Traceback (most recent call last)", 0, end)
        return text[start if start >= 0 else max(0, end - 3000): text.find("\n", end) + 1 or None]

    def _check_alive(self, doing: str) -> None:
        if self.process is None:
            raise ServerError("ComfyUI server is not running (call start()).")
        code = self.process.poll()
        if code is not None:
            raise ServerError(f"ComfyUI server exited with code {code} {doing}.\n{self.log_tail()}")

    # ---------------------------------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def object_info(self, node_type: str | None = None) -> dict:
        """GET /object_info (all node schemas) or /object_info/<node_type>."""
        path = "/object_info" + (f"/{urllib.parse.quote(node_type)}" if node_type else "")
        return self._request("GET", path, timeout=60)

    def post_prompt(self, api_graph: dict, workflow: dict | None = None, prompt_id: str | None = None) -> str:
        """Queue an API-format graph; returns its prompt_id. The UI workflow (if given) is embedded in the
        output PNG like the frontend does. Raises PromptRejected with ComfyUI's node_errors on a 400."""
        self._check_alive("before queueing a prompt")
        body: dict = {"prompt": api_graph, "client_id": self.client_id}
        if prompt_id:
            body["prompt_id"] = prompt_id
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        try:
            answer = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                parsed = json.loads(detail)
            except json.JSONDecodeError:
                raise ServerError(f"POST /prompt failed with HTTP {err.code}: {detail[:2000]}") from None
            raise PromptRejected(format_rejection(parsed), parsed.get("error", {}),
                                 parsed.get("node_errors", {})) from None
        if answer.get("node_errors"):
            raise PromptRejected(format_rejection(answer), {}, answer["node_errors"])
        return answer["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history/<id> until the prompt finished; returns its history entry. Raises ServerError with
        the node, exception and traceback when execution failed, or on timeout (with the server log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(f"while running prompt {prompt_id}")
            history = self._request("GET", f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise ServerError(f"prompt {prompt_id} failed:\n{format_execution_error(entry)}")
                return entry
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")

    def run(self, api_graph: dict, workflow: dict | None = None, timeout: float = 300.0) -> dict:
        """post_prompt + wait_history."""
        return self.wait_history(self.post_prompt(api_graph, workflow), timeout)

    def output_images(self, entry: dict, kind: str = "output") -> list[Path]:
        """Files the prompt's output nodes reported (`images` in each node's ui output) that exist on disk."""
        roots = {"output": self.output_dir, "temp": self.base_dir / "temp", "input": self.base_dir / "input"}
        found = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                if image.get("type", "output") != kind:
                    continue
                path = roots.get(image.get("type", "output"), self.output_dir) / image.get("subfolder", "") / image["filename"]
                if path.exists():
                    found.append(path)
        return found

    def free_memory(self) -> None:
        """POST /free: unload models and drop cached node results, so the next prompt really executes.
        The worker applies it asynchronously, within a moment."""
        self._request("POST", "/free", {"unload_models": True, "free_memory": True})

    def set_user_setting(self, setting_id: str, value) -> None:
        """POST /settings/<id>: a frontend setting of the default user (as the settings dialog saves it)."""
        self._request("POST", f"/settings/{urllib.parse.quote(setting_id)}", value)

    def queue_is_empty(self) -> bool:
        queue = self._request("GET", "/queue")
        return not queue.get("queue_running") and not queue.get("queue_pending")


def format_rejection(answer: dict) -> str:
    """One readable message from a /prompt 400 answer: the top error and each node's errors."""
    lines = []
    error = answer.get("error") or {}
    if error:
        lines.append(f"{error.get('type', 'error')}: {error.get('message', '')} {error.get('details', '')}".strip())
    for node_id, info in (answer.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "prompt rejected by ComfyUI: " + ("\n".join(lines) or json.dumps(answer)[:2000])


def format_execution_error(entry: dict) -> str:
    """The execution_error message(s) of a history entry, with node id/type and the traceback tail."""
    parts = []
    for message_type, data in entry.get("status", {}).get("messages", []):
        if message_type in ("execution_error", "execution_interrupted"):
            trace = "".join(data.get("traceback", []))[-3000:]
            parts.append(f"{message_type} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}\n{trace}")
    return "\n".join(parts) or json.dumps(entry.get("status", {}))[:3000]
