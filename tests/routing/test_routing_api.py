"""The typed public API: strategies as one protocol, the lazy top-level exports as editors see
them, and errors that carry the expert they are about."""

import ast
import inspect
from typing import get_args, get_type_hints

import pytest

import quiver
from quiver.errors import IncompatibleExpertError, RoutingError
from quiver.routing import Arrow, Merge, Oracle, Strategy, route, single
from quiver.routing.layers import Mixer
from quiver.routing.strategies import STRATEGIES
from quiver.testing import make_random_expert, tiny_model


def test_every_strategy_is_a_strategy_and_route_refuses_other_objects(llama, expert_paths):
    for strategy in (Arrow(), Merge(), single("e0"), Oracle()):
        assert isinstance(strategy, Strategy)
    names, protocol = get_args(get_type_hints(route)["strategy"])
    assert protocol is Strategy and set(get_args(names)) == set(STRATEGIES)
    with pytest.raises(RoutingError, match=r"strategy must be a name or a strategy object"):
        route(llama, expert_paths(llama, 2), 42)


def test_mixers_declare_select_and_update():
    assert Mixer.__abstractmethods__ == {"select", "update_"}
    for method in ("select", "update_", "route_"):
        assert "return" in get_type_hints(getattr(Mixer, method))


def test_the_type_checking_imports_mirror_the_lazy_exports():
    tree = ast.parse(inspect.getsource(quiver))
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n))
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert seen == quiver._LAZY_EXPORTS
    assert set(quiver.__all__) == {"QuiverError", "__version__", *seen}
    for name in seen:
        assert getattr(quiver, name) is not None


def test_errors_about_one_expert_name_it(llama, tmp_path):
    good = make_random_expert(llama, tmp_path / "good")
    bigger = make_random_expert(tiny_model("llama", hidden=48), tmp_path / "bigger")
    narrow = make_random_expert(llama, tmp_path / "narrow", rank=4)
    with pytest.raises(IncompatibleExpertError) as bad_shape:
        route(llama, [good, bigger], "arrow")
    with pytest.raises(IncompatibleExpertError) as bad_rank:
        route(llama, [good, narrow], "uniform")
    with pytest.raises(RoutingError) as unknown:
        route(llama, [good, narrow], "single", expert="nope")
    assert (bad_shape.value.expert, bad_rank.value.expert, unknown.value.expert) == (
        "bigger",
        "narrow",
        "nope",
    )
