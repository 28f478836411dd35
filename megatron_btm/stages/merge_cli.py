"""Register a finished training run in the forest (BTM's merge stage).

`--seed` creates the forest from the seed run. Otherwise the run is an expert: its parents and
weights come from the branch it started from. Merging is atomic, safe when many jobs merge at
once, and idempotent (merging the same run again changes nothing).

`--run` names a finished *run folder* (stage.json, checkpoints/, logs), not a checkpoint: the
merge reads the run's record (domain, steps, tokens, branch parents) and its latest checkpoint.
"""
from megatron_btm import cli_args

HELP = "register a finished seed or expert run in the forest"


def add_arguments(parser):
    cli_args.add_forest(parser, help="forest folder (created by `btm merge --seed`)")
    cli_args.add_list_option(parser, "--run", dest="runs", required=True, metavar="DIR",
                             help="finished run folder (stage.json + checkpoints/), not a checkpoint")
    parser.add_argument("--seed", action="store_true", help="the run is the seed: create the forest")
    cli_args.add_domain(parser, required=False, help="expert domain (default: the run's own)")
    parser.add_argument("--cycle", type=int, default=None,
                        help="BTM cycle of the expert (default: from its branch record)")
    parser.add_argument("--expert-id", default=None, help="expert id (default: the domain)")
    parser.add_argument("--parents", default=None, metavar="ID:W,ID:W",
                        type=cli_args.comma_list("--parents", _parent, what="ID:WEIGHT"),
                        help="parents and weights of a run without a branch record (random "
                        "init, a plain checkpoint), e.g. seed:1 (default: its branch record)")


def _parent(item: str) -> tuple[str, float]:
    pid, sep, weight = item.rpartition(":")
    if not sep or not pid:
        raise ValueError(item)
    return pid, float(weight)


def run(args):
    from megatron_btm.stages.merge import merge_expert, merge_seed
    if args.seed:
        if len(args.runs) != 1:
            raise ValueError("--seed takes exactly one --run")
        forest = merge_seed(args.forest, args.runs[0])
        print(f"forest {forest.root}: seed registered")
        return
    if (args.expert_id or args.parents) and len(args.runs) > 1:
        raise ValueError("--expert-id / --parents describe one expert; give one --run with them")
    for run_dir in args.runs:
        record = merge_expert(args.forest, run_dir, domain=args.domain, cycle=args.cycle,
                              expert_id=args.expert_id, parents=args.parents)
        parents = ", ".join(f"{p}:{w:.3f}" for p, w in record.parents)
        print(f"merged {record.id} (domain {record.domain}, cycle {record.cycle}, parents {parents})")
