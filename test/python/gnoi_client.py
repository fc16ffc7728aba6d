#!/usr/bin/env python3
"""A gNOI client written against the published gNOI API, used by test/vm/gnoi-python.test.ts.

It generates its Python stubs at run time from the agent's proto/ directory (python3 -m
grpc_tools.protoc into a temporary directory), connects with mutual TLS and prints one JSON
object per line for every response (or error) it sees.

  gnoi_client.py --proto-dir DIR --address HOST:PORT --ca F --cert F --key F COMMAND ...
    install --bundle DIR [--version V] [--chunk N]   tar (ustar) the bundle and Install it
    activate --version V [--no-reboot]
    verify
"""
import argparse
import glob
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import tempfile

import grpc

GNOI = "github.com/openconfig/gnoi"


def out(**kw):
    print(json.dumps(kw), flush=True)


def load_stubs(proto_dir, work):
    files = [f"{GNOI}/types/types.proto", f"{GNOI}/os/os.proto", f"{GNOI}/system/system.proto"]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={work}", f"--grpc_python_out={work}", *files],
        check=True,
    )
    # protoc puts *_pb2.py under github/com/... (the module path github.com.openconfig...) but the
    # *_pb2_grpc.py files under the literal directory github.com/...; move them next to the others.
    for f in glob.glob(os.path.join(work, "github.com", "**", "*_pb2_grpc.py"), recursive=True):
        rel = os.path.relpath(f, os.path.join(work, "github.com"))
        dest = os.path.join(work, "github", "com", rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(f, dest)
    sys.path.insert(0, work)
    import importlib

    mods = {}
    for name in ["os.os_pb2", "os.os_pb2_grpc", "system.system_pb2", "system.system_pb2_grpc"]:
        mods[name] = importlib.import_module(f"github.com.openconfig.gnoi.{name}")
    return mods


def bundle_tar(bundle, dest):
    """A ustar archive of the bundle directory's files, at its top level."""
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(os.listdir(bundle)):
            tar.add(os.path.join(bundle, name), arcname=name, recursive=False)
    return os.path.getsize(dest)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--timeout", type=float, default=900)
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install")
    i.add_argument("--bundle", required=True)
    i.add_argument("--version", default="")
    i.add_argument("--chunk", type=int, default=256 * 1024)
    a = sub.add_parser("activate")
    a.add_argument("--version", required=True)
    a.add_argument("--no-reboot", action="store_true")
    sub.add_parser("verify")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="gnoi-py-")
    try:
        mods = load_stubs(args.proto_dir, work)
        os_pb2, os_grpc = mods["os.os_pb2"], mods["os.os_pb2_grpc"]
        creds = grpc.ssl_channel_credentials(
            root_certificates=open(args.ca, "rb").read(),
            private_key=open(args.key, "rb").read(),
            certificate_chain=open(args.cert, "rb").read(),
        )
        channel = grpc.secure_channel(args.address, creds, options=[("grpc.ssl_target_name_override", "localhost")])
        stub = os_grpc.OSStub(channel)
        try:
            if args.cmd == "verify":
                r = stub.Verify(os_pb2.VerifyRequest(), timeout=args.timeout)
                standby = r.verify_standby
                which = standby.WhichOneof("state")
                out(
                    event="verify",
                    version=r.version,
                    image_name=r.image_name,
                    activation_fail_message=r.activation_fail_message,
                    standby_kind=which or "",
                    standby_state=os_pb2.StandbyState.State.Name(standby.standby_state.state) if which == "standby_state" else "",
                    standby_id=standby.verify_response.id if which == "verify_response" else "",
                    standby_version=standby.verify_response.version if which == "verify_response" else "",
                )
            elif args.cmd == "activate":
                r = stub.Activate(os_pb2.ActivateRequest(version=args.version, no_reboot=args.no_reboot), timeout=args.timeout)
                if r.WhichOneof("response") == "activate_ok":
                    out(event="activate_ok")
                else:
                    out(event="activate_error", type=os_pb2.ActivateError.Type.Name(r.activate_error.type), detail=r.activate_error.detail)
            else:
                install(args, os_pb2, stub, work)
        except grpc.RpcError as e:
            out(event="rpc_error", code=e.code().name, details=e.details())
        channel.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install(args, os_pb2, stub, work):
    tar_path = os.path.join(work, "package.tar")
    size = bundle_tar(args.bundle, tar_path)
    out(event="packed", bytes=size)
    q = queue.Queue()
    q.put(os_pb2.InstallRequest(transfer_request=os_pb2.TransferRequest(version=args.version, package_size=size)))
    responses = stub.Install(iter(q.get, None), timeout=args.timeout)
    sent = False
    try:
        for r in responses:
            kind = r.WhichOneof("response")
            if kind == "transfer_ready":
                out(event="transfer_ready")
                if not sent:
                    sent = True
                    chunks = 0
                    with open(tar_path, "rb") as f:
                        while True:
                            b = f.read(args.chunk)
                            if not b:
                                break
                            q.put(os_pb2.InstallRequest(transfer_content=b))
                            chunks += 1
                    q.put(os_pb2.InstallRequest(transfer_end=os_pb2.TransferEnd()))
                    out(event="sent", chunks=chunks, bytes=size)
            elif kind == "transfer_progress":
                out(event="transfer_progress", bytes_received=r.transfer_progress.bytes_received)
            elif kind == "validated":
                out(event="validated", version=r.validated.version, description=r.validated.description)
            elif kind == "install_error":
                out(event="install_error", type=os_pb2.InstallError.Type.Name(r.install_error.type), detail=r.install_error.detail)
            else:
                out(event="other", kind=kind or "")
    finally:
        q.put(None)


if __name__ == "__main__":
    main()
