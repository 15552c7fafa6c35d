"""The import structure stays layered: every import points down the declared layer order, no package or
module imports one that imports it back, no function hides an import of a nanoseek module, and nothing but
`nanoseek.cli` (by name) reaches the command-line modules. docs/DESIGN.md §1 draws the same order.

The checks read the source with `ast` (nothing is imported), so they see the imports that run late too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nanoseek

ROOT = Path(nanoseek.__file__).resolve().parent

# Bottom -> top. A module belongs to the longest entry that prefixes its dotted name; it may import modules of
# its own entry and of entries in LOWER layers only. Entries of one layer do not import each other in a circle.
LAYERS: list[list[str]] = [
    ["nanoseek.errors", "nanoseek.files", "nanoseek.recipe"],       # utilities
    ["nanoseek.config", "nanoseek.tasks"],                          # model configs; problems + verifiers
    ["nanoseek.tokenizer"],                                          # BPE + chat template (no corpus)
    ["nanoseek.kernels", "nanoseek.model"],                         # Triton kernels; single-device model
    ["nanoseek.hf", "nanoseek.info"],                               # HF checkpoints; parameter/FLOP accounting
    ["nanoseek.data"],                                               # corpus, shards, SFT data
    ["nanoseek.parallel"],                                           # FSDP / EP / PP applied from outside
    ["nanoseek.run"],                                                # run dir, checkpoints, device, seeds, ranks
    ["nanoseek.sampling"],                                           # rollout engine, prompts, rule rewards
    ["nanoseek.eval"],                                               # pass@k, cons@k, intervals
    ["nanoseek.train"],                                              # the training loop, pretrain/SFT/extend
    ["nanoseek.rl"],                                                 # GRPO / PPO, reward model
    ["nanoseek.r1", "nanoseek.distill"],                            # R1 data stages; distillation
    ["nanoseek.report"],                                             # the pipeline's report
    ["nanoseek.pipeline"],                                           # the R1 story as a stage graph
    ["nanoseek.commands"],                                           # CLI modules (thin)
    ["nanoseek.cli", "nanoseek.__main__", "nanoseek"],              # entry points and the package facade
]

# Optional heavy dependencies stay lazy: importing these needs a package a CPU install may lack.
LAZY_OK = {"nanoseek.kernels.fp8_triton", "nanoseek.kernels.decode_attention"}   # import triton


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _entry(module: str) -> tuple[int, str]:
    best = None
    for level, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (level, entry)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported nanoseek module, line, at module level) for every import statement of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from nanoseek.x import y` imports the submodule nanoseek.x.y when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            if t == "nanoseek" or t.startswith("nanoseek."):
                out.append((t, node.lineno, id(node) in top))
    return out


EDGES = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in MODULES:
        _entry(m)


def test_imports_point_down_the_layers():
    upward = set()
    for m, edges in EDGES.items():
        level, entry = _entry(m)
        for target, line, _ in edges:
            t_level, t_entry = _entry(target)
            if t_level > level:       # the same layer is allowed unless it closes a circle (checked below)
                upward.add(f"{MODULES[m].relative_to(ROOT.parent)}:{line}: {m} imports {target} "
                           f"(layer {t_level} {t_entry} is above layer {level} {entry})")
    assert not upward, "imports pointing up the layer order:\n" + "\n".join(sorted(upward))


def test_no_circles_between_packages_or_modules():
    entries: dict[str, set[str]] = {}
    modules: dict[str, set[str]] = {}
    for m, edges in EDGES.items():
        if m == "nanoseek":
            continue                  # the facade re-exports from below; nothing imports it by name
        src = _entry(m)[1]
        for target, _, _ in edges:
            if target == "nanoseek":
                continue
            modules.setdefault(m, set()).add(target)
            dst = _entry(target)[1]
            if dst != src:
                entries.setdefault(src, set()).add(dst)
    assert not _cycles(entries), f"packages that import each other: {_cycles(entries)}"
    assert not _cycles(modules), f"modules that import each other: {_cycles(modules)}"


def test_no_function_local_imports_of_nanoseek_modules():
    hidden = {f"{MODULES[m].relative_to(ROOT.parent)}:{line}: {target}"
              for m, edges in EDGES.items() for target, line, at_top in edges
              if not at_top and target not in LAZY_OK}
    assert not hidden, "imports of nanoseek modules inside functions (hoist them to the top):\n" + "\n".join(sorted(hidden))


def test_command_modules_are_reached_only_through_the_cli():
    from nanoseek.cli import COMMANDS

    importers = [f"{m} imports {t}" for m, edges in EDGES.items() for t, _, _ in edges
                 if t.startswith("nanoseek.commands") and not m.startswith("nanoseek.commands")]
    assert not importers, importers
    for name, (module, _) in COMMANDS.items():
        assert module.startswith("nanoseek.commands."), f"command {name} runs {module}, not a nanoseek.commands module"
        assert module in MODULES, f"command {name}: {module} does not exist"
