"""Run an experiment plan: one JSON per finished unit under OUTPUT/runs/, then the report.

Units (each skipped when its JSON exists; training inside resumes from checkpoints):
  dense-s<seed>          compute-matched dense baseline, one per seed (the noise level)
  btm-f<frac>            a forest at seed fraction frac: ensembles, top-k, averages, experts
  novel-<domain>         a novel-domain expert branched from the seed vs from the posterior
                         top-k average of the main forest, same short training
  removal-<domain>       the main forest with one expert removed (Forest.remove on a copy)
  random-split           experts on a random split of the same documents
  dense-x<s>-s<seed>, btm-x<s>-f<frac>   the crossover budgets (s × total_tokens)
  btm-seed-<label>, removal-<domain>-seed-<label>   a forest whose seed trained on the
                         seed corpus <label> (plan.seed_corpora), and its removal
All in one process with one world-1 process group (as `btm demo`); each training run re-creates
Megatron's model-parallel state.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from megatron_btm.experiment import units
from megatron_btm.experiment.plan import ExperimentPlan
from megatron_btm.utils.io import atomic_write_json, read_json
from megatron_btm.inference import rows as R

# the averaged models' names: their rows are R.UNIFORM_AVERAGE / R.POSTERIOR_AVERAGE
AVG_UNIFORM, AVG_POSTERIOR = (R.model_name(r) for r in (R.UNIFORM_AVERAGE, R.POSTERIOR_AVERAGE))
# plan keys that may change between invocations on the same OUTPUT (they do not change results)
RESUME_FREE_KEYS = ("threads",)
# Lists of independent units: a resumed run may add entries (new units run, finished ones stay
# valid) but not drop or change any.
RESUME_EXTENDABLE_KEYS = ("seed_fractions", "crossover_fractions", "dense_seeds", "seed_corpora")


def frac_tag(f: float) -> str:
    return f"{f:.2f}"


def environment(command: str | None) -> dict[str, Any]:
    """What reproduces the run: the command, package versions, this checkout's git commit."""
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    repo = Path(__file__).resolve().parents[2]

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    import torch
    status = git("--no-optional-locks", "status", "--porcelain")  # read-only: no index refresh
    return {"command": command or " ".join(["btm", *sys.argv[1:]]),
            "python": platform.python_version(), "torch": torch.__version__,
            "megatron-core": version("megatron-core"), "tokenizers": version("tokenizers"),
            "git_commit": git("rev-parse", "HEAD") or "none (no commit yet)",
            "git_dirty": bool(status) if status is not None else None,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "device": _device(torch),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _device(torch) -> str:
    """What the runs trained on: the CUDA device's name, else the CPU model."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"cpu: {model or 'unknown'} ({os.cpu_count()} cpus)"


class Runner:
    def __init__(self, plan: ExperimentPlan, output: str | Path, *, log: Callable = print,
                 command: str | None = None, only: list[str] | None = None):
        self.plan, self.out, self.log, self.command = plan, Path(output), log, command
        self.only = list(only or [])  # unit-name patterns (fnmatch): run only these
        self.data = self.out / "data"
        self.runs = self.out / "runs"
        self.work = self.out / "work"
        self.vocab = 0
        self.ran: list[str] = []  # units this invocation ran (not skipped)

    # ---- bookkeeping -------------------------------------------------------------------------
    def _done(self, unit: str) -> dict[str, Any] | None:
        path = self.runs / f"{unit}.json"
        return read_json(path) if path.is_file() else None

    def _unit(self, unit: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
        import fnmatch
        done = self._done(unit)
        if done is not None:
            self.log(f"== {unit}: done (runs/{unit}.json), skipped")
            return done
        if self.only and not any(fnmatch.fnmatchcase(unit, p) for p in self.only):
            self.log(f"== {unit}: not in --only {','.join(self.only)}, not run")
            return None
        self.log(f"== {unit}")
        t0 = time.perf_counter()
        record = fn(self.work / unit)
        record = {"unit": unit, **record, "seconds": round(time.perf_counter() - t0, 1),
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(self.runs / f"{unit}.json", record)
        self.ran.append(unit)
        return record

    def _check_same_plan(self) -> None:
        """A resumed OUTPUT must come from the same plan: finished units would otherwise be
        reported next to runs of another configuration."""
        path = self.out / "plan.json"
        if not path.is_file():
            return
        old, new = read_json(path), self.plan.to_dict()

        defaults = ExperimentPlan.field_defaults()

        if isinstance(old.get("model"), dict):   # a model field added since: its default
            import dataclasses

            from megatron_btm.megatron.model import GPTConfig
            old["model"] = {**dataclasses.asdict(GPTConfig()), **old["model"]}

        def compatible(k):
            if k in RESUME_FREE_KEYS or old.get(k, defaults.get(k)) == new.get(k):
                return True  # a key an older plan.json lacks counts as its default
            if k == "crossover_dense_seeds":  # more dense seeds per budget: new units only
                return (old.get(k, 1) or len(new["dense_seeds"])) <= (new[k] or len(new["dense_seeds"]))
            o, n = old.get(k, defaults.get(k)), new.get(k)
            if k in RESUME_EXTENDABLE_KEYS and isinstance(o, dict) and isinstance(n, dict):
                return all(n.get(key) == v for key, v in o.items())
            return (k in RESUME_EXTENDABLE_KEYS and isinstance(o, list)
                    and isinstance(n, list) and set(o) <= set(n))
        differ = sorted(k for k in set(old) | set(new) if not compatible(k))
        if differ:
            raise ValueError(f"{self.out}: holds results of a different plan ({path}); keys "
                             f"{differ} differ (e.g. {differ[0]}: {old.get(differ[0])!r} there, "
                             f"{new.get(differ[0])!r} now); choose another --output (only "
                             f"{', '.join(RESUME_EXTENDABLE_KEYS)} may gain entries on a resume)")

    # ---- the whole experiment ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch

        from megatron_btm.megatron import parallel
        plan = self.plan
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_plan()
        if plan.threads:  # before recording the environment, which reports torch's threads
            torch.set_num_threads(plan.threads)
        env_path = self.out / "environment.json"
        env = environment(self.command)
        t_started = env["started"]
        previous: list[dict[str, Any]] = []
        if env_path.is_file():  # a resumed run: keep the first start, record every invocation
            first = read_json(env_path)
            env["started"] = first.get("started", env["started"])
            env["commands"] = first.get("commands", [first.get("command")]) + [env["command"]]
            previous = first.get("invocations") or [
                {k: first.get(k) for k in ("command", "git_commit", "git_dirty", "started", "finished")}]
        atomic_write_json(env_path, env)
        atomic_write_json(self.out / "plan.json", plan.to_dict())
        self.vocab = units.prepare_data(plan, self.data, self.log)
        parallel.init_distributed()

        f0 = plan.main_seed_fraction
        # smallest budgets first, then the main budget's dense seeds and main forest: a crossover
        # is measurable between two run budgets as early as possible; then the sweeps
        for scale in plan.crossover_fractions:
            for seed in plan.crossover_seeds():
                self._unit(f"dense-x{scale:g}-s{seed}",
                           lambda w, s=scale, seed=seed: self.dense_unit(w, seed, s))
            self._unit(f"btm-x{scale:g}-f{frac_tag(f0)}", lambda w, s=scale: self.btm_unit(w, f0, s))
        for seed in plan.dense_seeds:
            self._unit(f"dense-s{seed}", lambda w, s=seed: self.dense_unit(w, s, 1.0))
        for f in sorted(plan.seed_fractions, key=lambda f: (f != f0, abs(f - f0))):
            self._unit(f"btm-f{frac_tag(f)}", lambda w, f=f: self.btm_unit(w, f, 1.0))
        main = self.work / f"btm-f{frac_tag(f0)}" / "forest"
        self._unit(f"removal-{plan.removal_domain}", lambda w: self.removal_unit(w, main))
        for label in plan.seed_corpora:
            if plan.seed_corpora[label] == "all":
                continue  # the main forest
            self._unit(f"btm-seed-{label}", lambda w, lab=label: self.btm_unit(
                w, f0, 1.0, seed_domains=plan.seed_domains(lab)))
            self._unit(f"removal-{plan.removal_domain}-seed-{label}", lambda w, lab=label:
                       self.removal_unit(w, self.work / f"btm-seed-{lab}" / "forest"))
        for d in plan.novel_domains:
            self._unit(f"novel-{d}", lambda w, d=d: self.novel_unit(w, main, d))
        if plan.random_split:
            self._unit("random-split", lambda w: self.random_split_unit(w, main))

        from megatron_btm.experiment import report
        env["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        env["seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
        # which checkout produced which units (a resumed run may span commits)
        this = {k: env[k] for k in ("command", "git_commit", "git_dirty")}
        this.update(started=t_started, finished=env["finished"], units=list(self.ran))
        env["invocations"] = previous + [this]
        atomic_write_json(env_path, env)
        return report.write_report(self.out, plan=plan.to_dict(), environment=env)

    # ---- units ---------------------------------------------------------------------------------
    def dense_unit(self, work: Path, seed: int, scale: float) -> dict[str, Any]:
        plan = self.plan
        steps = plan.schedule(plan.main_seed_fraction, scale)["dense_steps"]
        self.log(f"  dense: {steps} steps on the balanced mixture (compute-matched), seed {seed}")
        stage = units.run_dense(plan, self.data, work / "run", steps, self.vocab, seed)
        ckpt = work / "run" / "checkpoints" / stage["checkpoint"]
        test = units.eval_models({"dense": ckpt}, self.data, plan.train_domains + plan.novel_domains,
                                 split="test", max_blocks=plan.eval_blocks)
        return {"kind": "dense", "seed": seed, "scale": scale,
                "compute": {"tokens": stage["tokens"], "steps": stage["steps"],
                            "device_seconds": stage["device_seconds"]},
                "valid_loss": stage.get("valid_loss"),
                "test": {d: {R.DENSE: rows["dense"]} for d, rows in test.items()}}

    def btm_unit(self, work: Path, fraction: float, scale: float,
                 seed_domains: list[str] | None = None) -> dict[str, Any]:
        from megatron_btm.averaging.apply import average_checkpoints
        from megatron_btm.inference import estimate_priors, evaluate_forest, forest_checkpoints
        plan = self.plan
        sched = plan.schedule(fraction, scale)
        forest = units.build_forest(plan, self.data, work, seed_steps=sched["seed_steps"],
                                    expert_steps=sched["expert_steps"], vocab=self.vocab, log=self.log,
                                    seed_domains=seed_domains)
        domains = plan.train_domains + plan.novel_domains
        ckpts = forest_checkpoints(forest)
        ids = [i for i, _ in ckpts]
        self.log(f"  cached priors on valid ({plan.prior_sequences} blocks per domain)")
        priors = {d: [float(x) for x in p] for d, p in estimate_priors(
            forest, self.data, domains, split="valid", num_sequences=plan.prior_sequences,
            checkpoints=ckpts).items()}
        extra = {AVG_UNIFORM: work / "averages" / "uniform"}
        if not extra[AVG_UNIFORM].exists():
            average_checkpoints([p for _, p in ckpts], [1.0 / len(ckpts)] * len(ckpts),
                                extra[AVG_UNIFORM], progress=False)
        self.log(f"  evaluate {len(ids)} experts on test of {len(domains)} domains")
        table = evaluate_forest(forest, self.data, domains, split="test", priors=priors,
                                topk=[k for k in plan.topk if k <= len(ids)], extra_models=extra,
                                max_blocks=plan.eval_blocks, checkpoints=ckpts)["results"]
        for d in domains:  # posterior average: a different model per target domain
            path = work / "averages" / f"posterior-{d}"
            if not path.exists():
                average_checkpoints([p for _, p in ckpts], priors[d], path, progress=False)
            table[d][R.POSTERIOR_AVERAGE] = units.eval_models(
                {AVG_POSTERIOR: path}, self.data, [d], split="test",
                max_blocks=plan.eval_blocks)[d][AVG_POSTERIOR]
            # argmax averaging = one-hot weights = the single most likely expert's parameters
            best = ids[max(range(len(ids)), key=lambda j: priors[d][j])]
            table[d][R.ARGMAX_AVERAGE] = dict(table[d][f"expert/{best}"], expert=best)
        seed_stage = units.finished(work / "seed") or {}
        expert_tokens = sum((units.finished(units.expert_run(work, d)) or {}).get("tokens", 0)
                            for d in plan.train_domains)
        return {"kind": "btm", "seed_fraction": fraction, "scale": scale, "experts": ids,
                "seed_domains": list(seed_domains or plan.train_domains),
                "compute": {"seed_tokens": seed_stage.get("tokens", 0), "expert_tokens": expert_tokens,
                            "tokens": seed_stage.get("tokens", 0) + expert_tokens, **sched},
                "priors": priors, "test": table}

    def novel_unit(self, work: Path, forest: Path, domain: str) -> dict[str, Any]:
        from megatron_btm.stages.branch import BranchConfig, branch
        from megatron_btm.stages.train import train_expert
        plan = self.plan
        steps = plan.novel_steps()
        models, parents = {}, {}
        for policy, label in (("seed", "branch-seed"), ("topk", f"branch-top{plan.branch_k}")):
            bdir = work / f"branch-{policy}"
            if not (bdir / domain / "branch.json").is_file():
                branch(forest, domains=[domain], data_dir=self.data, output_dir=bdir,
                       cfg=BranchConfig(policy=policy, k=plan.branch_k,
                                        num_sequences=plan.prior_sequences), cycle=2)
            parents[label] = read_json(bdir / domain / "branch.json")["parents"]
            run = work / f"expert-{policy}"
            self.log(f"  {domain}: {label}, {steps} steps")
            if units.finished(run) is None:
                train_expert(units.train_config(plan, steps, self.vocab, plan.forest_seed, expert=True),
                             data_dir=self.data,
                             domain=domain, output_dir=run, init_from=bdir / domain)
            stage = units.finished(run)
            models[label] = run / "checkpoints" / stage["checkpoint"]
        models["branch-point-" + f"top{plan.branch_k}"] = work / "branch-topk" / domain
        test = units.eval_models(models, self.data, [domain], split="test", max_blocks=plan.eval_blocks)
        return {"kind": "novel", "domain": domain, "steps": steps,
                "tokens": steps * plan.expert_tokens_per_step(), "parents": parents,
                "test": {domain: {f"model/{k}": v for k, v in test[domain].items()}}}

    def removal_unit(self, work: Path, forest: Path) -> dict[str, Any]:
        from megatron_btm.forest import Forest
        from megatron_btm.inference import estimate_priors, evaluate_forest, forest_checkpoints
        plan = self.plan
        removed = plan.removal_domain
        copy = work / "forest"
        if not (copy / "forest.json").is_file() or removed in {e.id for e in Forest.open(copy).experts()}:
            shutil.rmtree(copy, ignore_errors=True)  # an interrupted copy: start over
            shutil.copytree(forest, copy)
            Forest.open(copy).remove(removed)
        # experts initialised from the removed one (none here: cycle-1 experts branch from the seed)
        descendants = Forest.open(copy).removed()[-1]["descendants"]
        ckpts = forest_checkpoints(copy)
        priors = {d: [float(x) for x in p] for d, p in estimate_priors(
            copy, self.data, plan.train_domains, split="valid", num_sequences=plan.prior_sequences,
            checkpoints=ckpts).items()}
        table = evaluate_forest(copy, self.data, plan.train_domains, split="test", priors=priors,
                                topk=[], single_experts=False, max_blocks=plan.eval_blocks,
                                checkpoints=ckpts)["results"]
        return {"kind": "removal", "removed": removed, "descendants": descendants,
                "experts": [i for i, _ in ckpts], "priors": priors, "test": table}

    def random_split_unit(self, work: Path, forest: Path) -> dict[str, Any]:
        from megatron_btm.data.preprocess import PreprocessConfig, preprocess
        from megatron_btm.forest import Forest
        from megatron_btm.inference import estimate_priors, evaluate_forest, forest_checkpoints
        plan = self.plan
        data = work / "data"
        names = [f"random{i}" for i in range(len(plan.train_domains))]
        if not (data / "report.json").is_file():
            self.log(f"  random split of the same documents into {len(names)} pseudo-domains")
            names = units.random_split_corpus(plan, work / "corpus")
            preprocess(PreprocessConfig(corpus_dir=str(work / "corpus"), output_dir=str(data),
                                        domains=names, splits=("train", "valid"),
                                        tokenizer=str(self.data / "tokenizer.json"),
                                        overwrite=True, progress=False))
        sched = plan.schedule(plan.main_seed_fraction)
        rforest = units.build_forest(plan, self.data, work, seed_steps=sched["seed_steps"],
                                     expert_steps=sched["expert_steps"], vocab=self.vocab,
                                     log=self.log, domains=names, expert_data=data,
                                     seed_checkpoint=Forest.open(forest).seed_checkpoint_path())
        ckpts = forest_checkpoints(rforest)
        priors = {d: [float(x) for x in p] for d, p in estimate_priors(
            rforest, self.data, plan.train_domains, split="valid",
            num_sequences=plan.prior_sequences, checkpoints=ckpts).items()}
        table = evaluate_forest(rforest, self.data, plan.train_domains, split="test", priors=priors,
                                topk=[], max_blocks=plan.eval_blocks, checkpoints=ckpts)["results"]
        tokens = sum((units.finished(units.expert_run(work, n)) or {}).get("tokens", 0) for n in names)
        return {"kind": "random-split", "experts": [i for i, _ in ckpts], "priors": priors,
                "compute": {"tokens": tokens, "expert_tokens": tokens}, "test": table}
