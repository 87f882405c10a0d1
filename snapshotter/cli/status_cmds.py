"""``lazysnap status [--json]``: what the daemon serves, from its ``lazysnap.v1.Node`` API.

``--json`` prints the daemon's status document unchanged (schema: docs/status-json.md);
without it, a plain-text table for a terminal.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from snapshotter.cli.daemon_api import get_status
from snapshotter.cli.units import human_bytes, human_duration


def cmd_status(args: argparse.Namespace) -> int:
    doc = get_status(args.address, args.timeout)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render(doc), end="")
    return 0


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "   - "


def _fill(fill: dict[str, Any] | None) -> str:
    if not fill:
        return "-"
    text = f"{fill['state']} {fill['chunks_done']}/{fill['chunks_total']}"
    if fill["bytes_per_s"]:
        text += f" {human_bytes(int(fill['bytes_per_s']))}/s"
    return text


def _layer_row(layer: dict[str, Any]) -> list[str]:
    digest = layer["digest"].split(":", 1)[-1][:12]
    if layer["state"] != "lazy":
        return [digest, "-", layer["state"] + (f" ({layer['reason']})" if layer.get("reason") else ""),
                "", "", "", "", ""]
    state = "quarantined" if layer["quarantined"] else ("complete" if layer["complete"] else "lazy")
    local = f"{human_bytes(layer['bytes_local'])}/{human_bytes(layer['bytes_total'])} " \
            f"{_pct(layer['bytes_local'], layer['bytes_total'])}"
    chunks = f"{layer['chunks_local']}/{layer['chunks_total']}"
    return [digest, layer["index_source"], state, local, chunks, str(layer["chunks_verified"]),
            _fill(layer["fill"]), human_bytes(layer["registry_bytes"])]


def _table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def render(doc: dict[str, Any]) -> str:
    d = doc["daemon"]
    out = [f"lazysnap {d['version']}  pid {d['pid']}  up {human_duration(d['uptime_s'])}  root {d['root']}\n"]
    store = doc.get("store")
    if store:
        limit = human_bytes(store["limit"]) if store["limit"] is not None else "none"
        out.append(f"store  {human_bytes(store['bytes'])} in {store['chunks']} chunks: pinned "
                   f"{human_bytes(store['pinned_bytes'])} by {store['pinned_layers']} layers, evictable "
                   f"{human_bytes(store['evictable_bytes'])}; limit {limit}, policy {store['policy']}\n")
    elif not d.get("lazy"):
        out.append("remote layers are off: containerd downloads every layer\n")
    if not doc["images"]:
        out.append("\nno image is served lazily\n")
    for img in doc["images"]:
        manifest = f"  ({img['manifest_digest']})" if img.get("manifest_digest") else ""
        out.append(f"\nIMAGE {img['ref']}{manifest}\n")
        rows = [["LAYER", "SOURCE", "STATE", "LOCAL", "CHUNKS", "VERIFIED", "FILL", "FETCHED"]]
        rows += [_layer_row(layer) for layer in img["layers"]]
        out.append(_table(rows))
        for layer in img["layers"]:
            if layer.get("quarantined"):
                out.append(f"  {layer['digest'][:19]} quarantined: {layer['quarantined']}\n")
    if doc["fallbacks"]:
        out.append("\nFALLBACKS (containerd downloaded these layers; newest last)\n")
        rows = [[_clock(f["time"]), f["image_ref"], f["layer_digest"].split(":", 1)[-1][:12], f["reason"],
                 f["detail"][:80]] for f in doc["fallbacks"]]
        out.append(_table(rows))
    if doc["errors"]:
        out.append("\nRECENT WARNINGS AND ERRORS (newest last)\n")
        for e in doc["errors"][-10:]:
            fields = " ".join(f"{k}={v}" for k, v in e["fields"].items())
            out.append(f"  {_clock(e['time'])} {e['level']:<7} {e['event']} {fields}"[:200] + "\n")
    return "".join(out)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))
