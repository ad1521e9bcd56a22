"""``offsite inspect DIR``: summarise an artifact's manifest."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise an artifact folder's manifest")
    p.add_argument("path", help="artifact folder")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    from .common import add_trust

    add_trust(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..artifacts import check_trusted, read_manifest
    from .common import print_json

    m = read_manifest(args.path)  # schema, identity and an embedded signature are checked; hashes by verify
    signature = check_trusted(m, args.trusted_keys, args.path)
    if args.json:
        print_json(m)
        return 0
    base = m.get("base", {})
    rows = [("kind", m["kind"]), ("offsite", m.get("offsite_version")), ("created", m.get("created")),
            ("base model", base.get("name_or_path")), ("family", m.get("family")),
            ("layers", base.get("num_layers"))]
    if "split" in m:
        rows.append(("adapter layers", ",".join(map(str, m["split"]["adapter"]))))
    if "method" in m:
        rows.append(("method", m["method"]))
    if "plan" in m and "layers" in m["plan"]:
        rows.append(("emulator layers", ",".join(str(e["source"]) for e in m["plan"]["layers"])))
    if "parameters" in m:
        rows.append(("parameters", ", ".join(f"{k} {v:,}" for k, v in m["parameters"].items())))
    if "disclosure" in m:
        from ..emulator.disclosure import format_fractions

        rows.append(("middle leaves", format_fractions(m["disclosure"]["fractions"])))
    if "emulator" in m:
        rows.append(("trained on emulator", m["emulator"].get("artifact_id", "")[:16]))
    if "dp" in m:
        from ..training.dp import summary

        rows.append(("differential privacy", summary(m["dp"])))
    rows.append(("files", f"{len(m['files'])}"))
    rows.append(("artifact id", m["artifact_id"][:16]))
    rows.append(("signature", signature))
    for key, value in rows:
        if value is not None:
            print(f"{key:<20} {value}")
    return 0
