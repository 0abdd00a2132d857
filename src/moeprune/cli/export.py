"""`moeprune export FORMAT EXPORT --out FILE`: other serving formats; today `gguf` (llama.cpp, Ollama, LM Studio)."""

from __future__ import annotations

from moeprune.cli.common import HelpFormatter, add_verb


def add_parser(sub) -> None:
    p = add_verb(sub, "export", "convert an export to another serving format (gguf for llama.cpp)",
                 "moeprune export gguf ./pruned --out pruned.gguf --outtype f16 --verify")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT",
                               help="the serving format to write (today: gguf)")
    g = formats.add_parser("gguf", help="one GGUF file for llama.cpp / Ollama / LM Studio",
                           description="Convert a stock-loadable checkpoint with llama.cpp's own converter, then "
                                       "check the file (architecture, expert count, expert tensor shapes).",
                           formatter_class=HelpFormatter,
                           epilog="example:\n  moeprune export gguf ./pruned --out pruned.gguf --verify")
    g.add_argument("model", metavar="export", help="checkpoint folder (a moeprune export or any HF checkpoint)")
    g.add_argument("--out", required=True, help="the .gguf file to write (atomically; never inside the input)")
    g.add_argument("--outtype", default="auto", choices=("auto", "f32", "f16", "bf16", "q8_0"),
                   help="tensor type in the file; auto keeps the checkpoint's stored float type (lossless)")
    g.add_argument("--verify", action="store_true",
                   help="run the file in llama.cpp and compare its logits and greedy continuations with "
                        "transformers before keeping it (needs llama-cpp-python: moeprune[gguf])")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.set_defaults(func=run)


def run(args) -> int:
    from moeprune.gguf import GgufOptions, export_gguf

    summary = export_gguf(args.model, args.out, GgufOptions(args.outtype, args.overwrite, args.verify))
    print(summary.line())
    return 0
