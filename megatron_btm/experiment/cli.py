"""Run a Branch-Train-Merge experiment plan (examples/paper-mini.yaml) and write its report.

Results go to OUTPUT: runs/<unit>.json per finished unit (dense baselines, one forest per seed
fraction, novel-domain branching, removal, random-split ablation), report.md with the claims
and their verdicts against the dense seed-to-seed noise, results.json and PNG plots. Re-running
with the same OUTPUT skips finished units and resumes training from checkpoints. The plan works
on any folder of <domain>/{train,valid,test}.jsonl (--corpus) and any subset of its domains.
"""
HELP = "run a BTM experiment plan (paper claims in miniature) → runs/*.json, report.md, plots"


def add_arguments(parser):
    from megatron_btm import cli_args
    parser.add_argument("plan", help="experiment plan YAML (e.g. examples/paper-mini.yaml)")
    cli_args.add_output(parser, required=False, metavar="DIR",
                        help="output folder (default: experiments/<plan name>)")
    cli_args.add_corpus(parser, required=False,
                        help="folder of <domain>/{train,valid,test}.jsonl (overrides the plan's)")
    cli_args.add_set(parser, help="override a plan key (YAML value), e.g. --set total_tokens=100000")
    parser.add_argument("--publish", default=None, metavar="DIR",
                        help="also copy report.md, plots, results and runs/*.json (no data, no "
                             "checkpoints) to DIR, e.g. bench/results/paper-mini")
    parser.add_argument("--check", action="store_true",
                        help="validate the plan and print its compute schedule; train nothing")
    parser.add_argument("--only", default=None, metavar="PATTERNS",
                        help="comma-separated unit-name patterns (fnmatch, e.g. 'dense-s*'): run only "
                             "these units this time (others stay as they are; the report covers "
                             "every finished unit)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild report.md and plots from OUTPUT/runs/*.json")


def schedule_text(plan) -> str:
    lines = [f"plan {plan.name}: {len(plan.train_domains)} training domains, "
             f"{len(plan.novel_domains)} novel; {plan.tokens_per_step()} tokens per step"
             + (f" (experts: batch {plan.expert_batch_size()}, {plan.expert_tokens_per_step()})"
                if plan.expert_batch_size() != plan.global_batch_size else "")]
    for f in plan.seed_fractions:
        s = plan.schedule(f)
        lines.append(f"  seed fraction {f:.0%}: seed {s['seed_steps']} steps, {s['expert_steps']} "
                     f"per expert, dense {s['dense_steps']}")
    for c in plan.crossover_fractions:
        s = plan.schedule(plan.main_seed_fraction, c)
        lines.append(f"  budget ×{c:g}: seed {s['seed_steps']}, {s['expert_steps']} per expert, "
                     f"dense {s['dense_steps']} x {len(plan.crossover_seeds())} seed(s)")
    for label in plan.seed_corpora:
        lines.append(f"  seed corpus {label}: seed on {', '.join(plan.seed_domains(label))}")
    if plan.novel_domains:
        lines.append(f"  novel experts: {plan.novel_steps()} steps each, 2 branch policies")
    return "\n".join(lines)


def run(args):
    import shlex
    import sys
    from pathlib import Path

    from megatron_btm.experiment.plan import load_plan
    plan = load_plan(args.plan, overrides=args.overrides, corpus=args.corpus)
    print(schedule_text(plan), flush=True)
    if args.check:
        return 0
    output = Path(args.output or Path("experiments") / plan.name)
    command = "btm experiment " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 2 and sys.argv[1] == "experiment" else None
    if args.report_only:
        from megatron_btm.experiment.report import write_report
        from megatron_btm.utils.io import read_json
        env_path = output / "environment.json"
        env = read_json(env_path) if env_path.is_file() else {}
        summary = write_report(output, plan=plan.to_dict(), environment=env)
    else:
        from megatron_btm.experiment.runner import Runner
        only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
        summary = Runner(plan, output, command=command, only=only,
                         log=lambda m: print(m, flush=True)).run()
    for c in summary.get("claims", []):
        print(f"  [{c['verdict']}] {c['claim']}: {c['detail']}")
    print(f"wrote {output / 'report.md'}")
    if args.publish:
        from megatron_btm.experiment.report import publish
        copied = publish(output, args.publish)
        print(f"published {len(copied)} files to {args.publish}")
    return 0
