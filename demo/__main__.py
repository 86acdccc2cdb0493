"""`python -m demo` (make demo): build the tiny SD1.5 checkpoint, the tiny Flux (with its CLIP-L and TAEF1), the
tiny Wan 2.2 high / low-noise experts (with a Wan VAE), their LoRAs and the training images under
demo-output/models, start the real ComfyUI server with LoRA Core installed, run every workflows/*.json through
/prompt and print where each output image (or animated WebP) is. `python -m demo --serve` (make serve): start the
same server for a person.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from demo import DEMO_MODELS, DEMO_OUTPUT, SANITY_WORKFLOW, example_workflows
from demo.server import ComfyServer, ServerError, free_port
from demo.tiny_model import ensure_demo_models
from demo.workflow_api import WorkflowError, load_workflow, ui_to_api, validate_workflow


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="start the server for a person and wait (Ctrl+C stops)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: 8188 for --serve if free)")
    parser.add_argument("--models", type=Path, default=DEMO_MODELS, help="models folder (created if missing)")
    parser.add_argument("--base", type=Path, default=DEMO_OUTPUT / "comfyui", help="ComfyUI base directory")
    parser.add_argument("--output", type=Path, default=DEMO_OUTPUT / "images", help="where SaveImage writes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per workflow")
    parser.add_argument("workflows", nargs="*", type=Path, help="workflow files (default: workflows/*.json)")
    return parser.parse_args(argv)


def _port_for_person(requested: int | None) -> int:
    if requested:
        return requested
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8188))
            return 8188
        except OSError:
            return free_port()


def run_workflows(server: ComfyServer, files: list[Path], timeout: float) -> int:
    """Validate, convert and run each workflow; print its images. Returns the number of failures."""
    object_info = server.object_info()
    failures = 0
    for path in files:
        started = time.perf_counter()
        try:
            workflow = load_workflow(path)
            problems = validate_workflow(workflow, object_info)
            if problems:
                raise WorkflowError("\n  ".join(["does not validate:"] + problems))
            entry = server.run(ui_to_api(workflow, object_info), workflow=workflow, timeout=timeout)
            images = server.output_images(entry)
            if not images:
                raise ServerError("finished but produced no output image")
        except (WorkflowError, ServerError, OSError, ValueError) as err:
            failures += 1
            print(f"FAILED {path.name}: {err}", flush=True)
            continue
        print(f"ok     {path.name} ({time.perf_counter() - started:.1f} s)", flush=True)
        for image in images:
            print(f"         {image}", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    ensure_demo_models(args.models)
    print(f"tiny SD1.5 checkpoint, tiny Flux (+ CLIP-L, TAEF1), tiny Wan 2.2 pair (+ VAE), LoRAs and training "
          f"images in {args.models} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    port = _port_for_person(args.port) if args.serve else args.port
    server = ComfyServer(args.base, args.models, port=port, output_dir=args.output)
    print(f"starting ComfyUI (log: {server.log_path}) ...", flush=True)
    with server.start():
        print(f"ComfyUI with LoRA Core is running at {server.url}", flush=True)
        import_error = server.pack_import_error()
        if import_error:
            print(f"LoRA Core FAILED to import; its nodes are missing:\n{import_error}", flush=True)
        if args.serve:
            print("Open that URL in a browser; drag a file from workflows/ onto the canvas. Ctrl+C stops.", flush=True)
            try:
                while server.process is not None and server.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                print("stopping", flush=True)
            return 0
        files = args.workflows or example_workflows()
        if not files:
            print("workflows/ has no example yet; running the core sanity graph instead.", flush=True)
            files = [SANITY_WORKFLOW]
        failures = run_workflows(server, files, args.timeout) + (1 if import_error else 0)
    print(f"{len(files) - failures} of {len(files)} workflows ran; images in {args.output}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
