"""How much of each core file is the paper's method, support it needs, or infrastructure beyond that.

    python .ci/core_sort.py          a markdown table: lines, and the share of each kind per file

A developer's tool. Every top-level definition (and, for the names listed as Class.method, one
method of a class) is sorted by hand below; its lines, from the comments right above it to its
end, count for its kind. "support" is what the paper's path needs to run (reading audio, a
checkpoint, a basic command line, basic DDP); "infrastructure" is what a long research run, a
large corpus or a user's mistakes need beyond that. The module docstring and the imports count
as "header"; blank lines between definitions count for nothing.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUPPORT = {
    "model.py": {"key_padding", "to_device"},
    "data.py": {"AudioError", "resampled_length", "read_header", "probe_audio", "resampler",
                "resample_24k", "read_audio", "list_audio", "find_audio", "Files", "scan_audio",
                "file_id", "cut_frames", "load_codec", "CHECKPOINTS", "load_checkpoint",
                "UsageError", "Parser", "at_least", "write_atomic", "device", "AUDIO_EXTS"},
    "train.py": {"TrainConfig", "TYPES", "CHOICES", "field_help", "parse_args", "check_config",
                 "read_files", "epoch_plan", "step_batches", "save_checkpoint", "log_metrics",
                 "setup_distributed", "wait_group", "barrier", "autocast_for", "main",
                 "print_start"},
    "kmeans.py": {"KMeansResult", "save", "load", "Source", "open_source", "parse_args", "run",
                  "main"},
    "evaluate.py": {"Task", "read_task", "kfold_splits", "read_split", "slug", "codec_batches",
                    "predict", "format_table", "evaluate", "load_model", "HearModel",
                    "get_timestamp_embeddings", "get_scene_embeddings", "parse_args",
                    "upstream_args", "open_upstream", "main", "METRICS", "EMBED_SEGMENT"},
}
INFRASTRUCTURE = {
    "model.py": {"ModelConfig.__post_init__", "codec_precision", "check_inputs"},
    "data.py": {"MIN_RATE", "MAX_RATE", "MAX_PEAK", "run_cli", "make_folder", "encodec_source"},
    "train.py": {"research_run", "PaperRun"},
    "kmeans.py": {"digest", "progress", "warn_skipped"},
    "evaluate.py": {"read_cache", "check_upstream", "embed_pieces"},
}
FILES = ("model.py", "data.py", "train.py", "kmeans.py", "evaluate.py")


def names(node):
    """The names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def first_line(node, lines):
    """The node's first line, its decorators and the comment lines right above it included."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    while start > 1 and lines[start - 2].lstrip().startswith("#"):
        start -= 1
    return start


def sort_file(name):
    """{kind: lines} of one core file."""
    text = open(os.path.join(ROOT, name)).read()
    lines = text.splitlines()
    kinds = {"method": 0, "support": 0, "infrastructure": 0, "header": 0}
    for node in ast.parse(text).body:
        span = node.end_lineno - first_line(node, lines) + 1
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)):
            kinds["header"] += span
            continue
        if isinstance(node, ast.If):  # if __name__ == "__main__":
            kinds["support"] += span
            continue
        defined = names(node)
        kind = "method"
        if set(defined) & SUPPORT[name]:
            kind = "support"
        if set(defined) & INFRASTRUCTURE[name]:
            kind = "infrastructure"
        if isinstance(node, ast.ClassDef):  # a method sorted apart from its class
            for item in node.body:
                key = f"{node.name}.{getattr(item, 'name', '')}"
                for other, table in (("support", SUPPORT), ("infrastructure", INFRASTRUCTURE)):
                    if key in table[name] and other != kind:
                        part = item.end_lineno - first_line(item, lines) + 1
                        kinds[other] += part
                        span -= part
        kinds[kind] += span
    kinds["lines"] = len(lines)
    return kinds


def main():
    print("| file | lines | method | support | infrastructure beyond the paper's needs |")
    print("|---|---|---|---|---|")
    for name in FILES:
        k = sort_file(name)
        share = {kind: f"{100 * k[kind] / k['lines']:.0f}%" for kind in ("method", "support",
                                                                          "infrastructure")}
        print(f"| {name} | {k['lines']} | {share['method']} | {share['support']} | "
              f"{share['infrastructure']} |")


if __name__ == "__main__":
    main()
