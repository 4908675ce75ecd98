"""The package's boundaries, read from its source with `ast` (no engine is built):

(a) vLLM is imported only by trl_correct/adapters/engine.py, and only there are its objects reached (`Engine.llm`,
    vLLM's LLM, and its `llm_engine`);
(b) outside trl_correct/adapters/, no private TRL/transformers name is reached: a `_name` attribute is read or set
    only on `self`/`cls`/`super()`, and only when trl_correct itself defines `_name` (a method, a class attribute, or
    an instance attribute it assigns); a name registered in trl_api.PRIVATE only where the module overrides it (its
    class defines it); no private name is imported from another package; a string equal to a registered name
    appears only as the name given to trl_api.patch_method. Every private TRL/transformers name the package defines
    (an override) is registered;
(c) every trl_api.PRIVATE entry names the release it was read in.

The checks take (path, source) pairs, so a test feeds them a source that breaks a rule (nothing is written to disk).
What the rules allow beyond that is listed in ALLOWED, each with its reason; an allowance no longer needed fails too.
"""

import ast
from pathlib import Path

import pytest

from trl_correct.adapters import trl_api

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = "trl_correct/adapters/"
VLLM_HOME = "trl_correct/adapters/engine.py"  # the one module that imports vLLM
IMPORTERS = {("importlib", "import_module"), ("importlib.util", "find_spec"), (None, "__import__"),
             (None, "import_module"), (None, "find_spec")}
ATTRIBUTE_FUNCS = ("getattr", "setattr", "hasattr", "delattr")
OWN_RECEIVERS = ("self", "cls")
VLLM_OBJECTS = ("llm", "llm_engine")  # Engine.llm is vLLM's LLM; LLM.llm_engine its engine core

# (path, private name): why the rules let it pass. Empty: everything the package does today passes without one.
ALLOWED: dict[tuple[str, str], str] = {}


def package_sources() -> list[tuple[str, str]]:
    """(path relative to the repository, source) of every module of trl_correct."""
    return [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in sorted((ROOT / "trl_correct").rglob("*.py"))]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


# -- (a) vLLM --------------------------------------------------------------------------------------------------------

def vllm_imports(sources) -> list[str]:
    """'path:line: ...' for each import of vLLM (a statement, or importlib/__import__ with a constant name) and each
    reach into the engine's vLLM objects (VLLM_OBJECTS) outside VLLM_HOME."""
    out = []
    for path, source in sources:
        if path == VLLM_HOME:
            continue
        for node in ast.walk(ast.parse(source, path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = _dotted(node.func) or ""
                module, _, attr = func.rpartition(".")
                if (module or None, attr) in IMPORTERS and isinstance(node.args[0].value, str):
                    names = [node.args[0].value]
            out += [f"{path}:{node.lineno}: imports {n} (vLLM belongs in {VLLM_HOME})" for n in names
                    if n.split(".")[0] == "vllm"]
            if isinstance(node, ast.Attribute) and node.attr in VLLM_OBJECTS:
                out.append(f"{path}:{node.lineno}: reaches vLLM's {ast.unparse(node)} (add an Engine method in "
                           f"{VLLM_HOME})")
    return sorted(out, key=lambda f: (f.split(":")[0], int(f.split(":")[1])))


# -- (b) private names -----------------------------------------------------------------------------------------------

def _class_level_names(tree) -> set[str]:
    """Names a class body of `tree` defines: methods, nested classes, class attributes."""
    out = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def _receiver(node) -> str | None:
    """'self' / 'cls' / 'super()' for an own receiver, else None."""
    if isinstance(node, ast.Name) and node.id in OWN_RECEIVERS:
        return node.id
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
        return "super()"
    return None


def _attribute_uses(tree):
    """(node, receiver expression, name, assigned) for every `x.name` and getattr-family call with a constant name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node, node.value, node.attr, isinstance(node.ctx, (ast.Store, ast.Del))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_FUNCS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            yield node, node.args[0], node.args[1].value, node.func.id in ("setattr", "delattr")


def defined_names(sources) -> set[str]:
    """Every private name trl_correct defines: in a class body, or assigned on `self`/`cls` anywhere."""
    out = set()
    for path, source in sources:
        tree = ast.parse(source, path)
        out |= _class_level_names(tree)
        out |= {name for _, receiver, name, assigned in _attribute_uses(tree) if assigned and _receiver(receiver)}
    return {n for n in out if _is_private(n)}


def _patch_method_names(tree) -> set[int]:
    """ids of the constant nodes given as the name to trl_api.patch_method (the sanctioned route to a private
    method)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (_dotted(node.func) or "").rpartition(".")[2] == "patch_method":
            name = node.args[1] if len(node.args) >= 2 else next((k.value for k in node.keywords if k.arg == "name"),
                                                                   None)
            if isinstance(name, ast.Constant):
                out.add(id(name))
    return out


def private_uses(sources, registered: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(path, name, 'path:line: why') for each reach past the boundary outside trl_correct/adapters/ (rule (b)), in
    source order."""
    registered = {p.name for p in trl_api.PRIVATE} if registered is None else registered
    ours = defined_names(sources)
    out = []
    for path, source in sources:
        if path.startswith(ADAPTERS):
            continue
        tree = ast.parse(source, path)
        overrides = _class_level_names(tree)
        sanctioned = _patch_method_names(tree)
        for node, receiver, name, _ in _attribute_uses(tree):
            if not _is_private(name):
                continue
            own = _receiver(receiver)
            where = f"{path}:{node.lineno}: {ast.unparse(receiver) if receiver is not None else '?'}.{name}"
            if own is None:
                out.append((path, name, f"{where}: a private attribute of an object that is not self/cls (reach it "
                                        "through an accessor of the object's own class, or of adapters/trl_api.py)"))
            elif name in registered and name not in overrides:
                out.append((path, name, f"{where}: TRL/transformers private name used directly (call its accessor "
                                        "in adapters/trl_api.py)"))
            elif name not in registered and name not in ours:
                out.append((path, name, f"{where}: not defined by trl_correct, so TRL's or transformers' (register it "
                                        "in trl_api.PRIVATE and add an accessor there)"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                module = node.module or ""
                bad = [a.name for a in node.names if _is_private(a.name)]
                if any(_is_private(part) for part in module.split(".")):
                    bad = bad or [module]
                out += [(path, n, f"{path}:{node.lineno}: imports private {n} from {module} (adapters/ only)")
                        for n in bad]
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in registered
                  and id(node) not in sanctioned):
                out.append((path, node.value, f"{path}:{node.lineno}: the string {node.value!r} names a registered "
                                              "private name (use its accessor, or trl_api.patch_method)"))
    return sorted(out, key=lambda f: (f[0], int(f[2].split(":")[1])))


def unregistered_overrides(sources, theirs: set[str], registered: set[str] | None = None) -> list[str]:
    """Private names the package defines outside adapters/ that TRL/transformers also define (`theirs`) but
    trl_api.PRIVATE does not register: an override TRL could rename under us unnoticed."""
    registered = {p.name for p in trl_api.PRIVATE} if registered is None else registered
    ours = defined_names([(p, s) for p, s in sources if not p.startswith(ADAPTERS)])
    return sorted(ours & theirs - registered)


def trl_private_names() -> set[str]:
    """Private names of TRL's GRPOTrainer: its class's (methods, class attributes, inherited from transformers'
    Trainer) and the instance attributes its source and its bases' assign."""
    cls = trl_api._grpo_trainer()  # imports vLLM (TRL's generation module); only this test needs it
    names = {n for n in dir(cls) if _is_private(n)}
    for klass in cls.__mro__:
        if klass is not object:
            names |= {n for n in trl_api._instance_attributes(klass) if _is_private(n)}
    return names


def _apply_allowances(found):
    return [why for path, name, why in found if (path, name) not in ALLOWED]


# -- the package as it is --------------------------------------------------------------------------------------------

def test_vllm_is_imported_and_reached_only_by_the_engine_adapter():
    assert vllm_imports(package_sources()) == []


def test_no_private_trl_or_transformers_name_outside_the_adapters():
    assert _apply_allowances(private_uses(package_sources())) == []


def test_every_allowance_is_still_needed():
    used = {(path, name) for path, name, _ in private_uses(package_sources())}
    assert [k for k in ALLOWED if k not in used] == [], "remove the allowance: the use it allowed is gone"


def test_every_trl_private_name_the_package_overrides_is_registered():
    assert unregistered_overrides(package_sources(), trl_private_names()) == []


def test_every_private_entry_names_the_release_it_was_read_in():
    verified = {"trl": trl_api.VERIFIED_TRL, "transformers": trl_api.VERIFIED_TRANSFORMERS}
    for p in trl_api.PRIVATE:
        lib, _, version = p.read_in.partition(" ")
        assert lib in verified and version in verified[lib], f"{p.owner}.{p.name}: read_in={p.read_in!r}"


# -- the checks fail when they must ----------------------------------------------------------------------------------

def _with(path: str, source: str) -> list[tuple[str, str]]:
    """The package's sources with `path`'s replaced by `source` (added when new)."""
    return [(p, s) for p, s in package_sources() if p != path] + [(path, source)]


def test_a_vllm_import_outside_the_engine_adapter_is_named():
    found = vllm_imports(_with("trl_correct/trainer.py", "import os\nimport vllm\n"))
    assert found == ["trl_correct/trainer.py:2: imports vllm (vLLM belongs in trl_correct/adapters/engine.py)"]
    found = vllm_imports([("trl_correct/gate.py", "from vllm.v1 import x\n"),
                          ("trl_correct/core/sampler.py", "import importlib\nimportlib.import_module('vllm.envs')\n"),
                          ("trl_correct/adapters/fingerprint.py", "def f():\n    import vllm.config\n"),
                          (VLLM_HOME, "import vllm\n")])
    assert sorted(f.split(":")[0] for f in found) == ["trl_correct/adapters/fingerprint.py",
                                                      "trl_correct/core/sampler.py", "trl_correct/gate.py"]


def test_driving_vllm_objects_outside_the_engine_adapter_is_named():
    # testing/faults.py before Engine.request_in_flight
    source = "def f(engine):\n    core = engine.llm.llm_engine\n    core.step()\n"
    found = vllm_imports(_with("trl_correct/testing/faults.py", source))
    assert found == ["trl_correct/testing/faults.py:2: reaches vLLM's engine.llm.llm_engine (add an Engine method in "
                     "trl_correct/adapters/engine.py)",
                     "trl_correct/testing/faults.py:2: reaches vLLM's engine.llm (add an Engine method in "
                     "trl_correct/adapters/engine.py)"], found


def test_private_names_reached_outside_the_adapters_are_named():
    source = '''
from trl import GRPOTrainer
from trl.trainer.utils import _private_helper


class Mine(GRPOTrainer):
    _tag_names = [*GRPOTrainer._tag_names, "x"]          # another class's private attribute

    def _save_checkpoint(self, model, trial):             # an override of a registered name
        super()._save_checkpoint(model, trial)            # its parent: allowed
        return self._get_output_dir(trial=trial)          # registered, not overridden here: use the accessor

    def step(self, trainer):
        self._mine = 1                                     # our own
        trainer._metrics                                  # not self
        getattr(self, "_buffered_inputs")                  # TRL's, unregistered, through getattr
        return self._mine, self.__class__
'''
    found = [why.split(": ", 1)[1] for why in _apply_allowances(private_uses(_with("trl_correct/mine.py", source)))
             if why.startswith("trl_correct/mine.py")]
    assert found == [
        "imports private _private_helper from trl.trainer.utils (adapters/ only)",
        "GRPOTrainer._tag_names: a private attribute of an object that is not self/cls (reach it through an accessor "
        "of the object's own class, or of adapters/trl_api.py)",
        "self._get_output_dir: TRL/transformers private name used directly (call its accessor in "
        "adapters/trl_api.py)",
        "trainer._metrics: a private attribute of an object that is not self/cls (reach it through an accessor of "
        "the object's own class, or of adapters/trl_api.py)",
        "self._buffered_inputs: not defined by trl_correct, so TRL's or transformers' (register it in "
        "trl_api.PRIVATE and add an accessor there)",
    ], found


def test_a_registered_name_as_a_string_passes_only_through_patch_method():
    source = ('from .adapters.trl_api import patch_method\n'
              'def f(t, g):\n'
              '    patch_method(t, "_generate_single_turn", g)\n'
              '    t.__dict__.pop("_generate_single_turn", None)\n')
    found = [why for why in _apply_allowances(private_uses(_with("trl_correct/testing/x.py", source)))
             if why.startswith("trl_correct/testing/x.py")]
    assert found == ["trl_correct/testing/x.py:4: the string '_generate_single_turn' names a registered private name "
                     "(use its accessor, or trl_api.patch_method)"]


def test_inside_the_adapters_private_names_are_allowed():
    source = "def f(trainer):\n    return trainer._metrics, getattr(trainer, '_buffered_inputs')\n"
    assert not [w for w in private_uses(_with("trl_correct/adapters/x.py", source)) if "adapters/x.py" in w[2]]


def test_an_unregistered_override_is_named():
    source = "class Mine:\n    def _prepare_inputs(self, inputs):\n        return inputs\n"
    assert unregistered_overrides(_with("trl_correct/mine.py", source), {"_prepare_inputs", "_metrics"}) == \
        ["_prepare_inputs"]


def test_an_entry_without_a_release_is_named(monkeypatch):
    entry = trl_api.Private("GRPOTrainer", "_prepare_inputs", "method", ("generation_batch",), "example")
    monkeypatch.setattr(trl_api, "PRIVATE", (*trl_api.PRIVATE, entry))
    with pytest.raises(AssertionError, match="GRPOTrainer._prepare_inputs: read_in=''"):
        test_every_private_entry_names_the_release_it_was_read_in()
