"""Run a whole Branch-Train-Merge experiment on a small default and print the results table.

Without --corpus, the corpus is harvested from this installation (Python standard library
source, the C++ headers shipped in torch, licence texts and package descriptions of installed
distributions: 4 domains of real text, nothing downloaded). With --corpus DIR it runs on any
folder of <domain>/{train,valid,test}.jsonl. Writes OUTPUT/results.json, OUTPUT/report.md and
two plots; re-running with the same OUTPUT resumes finished stages.
"""
HELP = "run a complete small BTM experiment (seed → experts → merge → eval) and report"


def add_arguments(parser):
    from megatron_btm import cli_args
    from megatron_btm.demo.pipeline import DemoConfig
    d = DemoConfig()
    cli_args.add_output(parser, default=d.output, metavar="DIR", help="output folder")
    cli_args.add_corpus(parser, required=False, help="folder of <domain>/{train,valid,test}.jsonl "
                        "(default: harvest the embedded corpus from this environment)")
    cli_args.add_domains(parser, required=False, help="comma-separated subset of the corpus' domains")
    parser.add_argument("--total-steps", type=int, default=d.total_steps,
                        help="optimizer steps of the BTM run (seed + experts); the dense baseline gets as many")
    parser.add_argument("--seed-fraction", type=float, default=d.seed_fraction,
                        help="share of the steps spent on the seed LM")
    parser.add_argument("--num-layers", type=int, default=d.num_layers, help="transformer layers")
    parser.add_argument("--hidden-size", type=int, default=d.hidden_size, help="model width")
    parser.add_argument("--seq-length", type=int, default=d.seq_length, help="sequence length")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    parser.add_argument("--max-train-docs", type=int, default=d.max_train_docs,
                        help="documents per domain and split to preprocess (0: all)")
    parser.add_argument("--eval-blocks", type=int, default=d.eval_blocks,
                        help="test blocks per domain in the evaluation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def run(args):
    from megatron_btm.demo.pipeline import DemoConfig, run_demo
    cfg = DemoConfig(output=args.output, corpus=args.corpus,
                     domains=args.domains,
                     total_steps=args.total_steps, seed_fraction=args.seed_fraction,
                     num_layers=args.num_layers, hidden_size=args.hidden_size,
                     seq_length=args.seq_length, vocab_size=args.vocab_size,
                     max_train_docs=args.max_train_docs or None, eval_blocks=args.eval_blocks,
                     threads=args.threads)
    run_demo(cfg)
