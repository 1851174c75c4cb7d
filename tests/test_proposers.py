"""Proposers (mutation, crossover, random, language model) and the predictor rho."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import optuna
import pytest

from kd_optuna.search.lineage import read_lineage
from kd_optuna.search.predictor import AdditivePredictor, RidgeFit
from kd_optuna.search.proposers import (
    CrossoverProposer,
    LLMProposer,
    Member,
    MutationProposer,
    ProposalContext,
    ProposerConfigError,
    RandomProposer,
    draw_option,
    mutate,
    parse_candidates,
)
from kd_optuna.search.sampler import EvolutionSampler
from kd_optuna.space import GENES, DistillerSpec, SearchSpace, suggest_distiller

optuna.logging.set_verbosity(optuna.logging.WARNING)

KEY = "sk-test-secret-0123456789"
KD = DistillerSpec("logit", "no", "no", "no", "kl", "no", 4, 1)
FITNETS = DistillerSpec("feat", "no", "no", "no", "l2", "no", 1, 100)
GOOD = DistillerSpec("feat", "no", "no", "no", "l2", "no", 1, 10)


def uniform(space: SearchSpace) -> dict:
    return {g: {o: 1.0 for o in space[g]} for g in GENES}


def context(space=None, seen=(), weights=None, parents=(KD, FITNETS), seed=0):
    space = space or SearchSpace()
    members = [Member(i, spec, float(i)) for i, spec in enumerate(parents)]
    return ProposalContext(
        space=space,
        weights=weights or uniform(space),
        population=members,
        parents=members,
        seen=set(seen),
        rng=np.random.RandomState(seed),
        mutation_prob=0.2,
    )


# -- mutation, crossover, random ------------------------------------------------------------


def test_mutate_redraws_exactly_the_listed_genes_from_positive_weights():
    weights = uniform(SearchSpace())
    weights["distance"] = {d: (1.0 if d in ("l1", "kl") else 0.0) for d in weights["distance"]}
    rng = np.random.RandomState(0)
    for _ in range(200):
        child, mutated = mutate(KD, weights, rng, prob=0.3)
        assert mutated
        changed = [g for g in GENES if getattr(child, g) != getattr(KD, g)]
        assert changed == list(mutated)
        if "distance" in mutated:
            assert child.distance == "l1"


def test_draw_option_honours_exclude_and_reports_exhaustion():
    rng = np.random.RandomState(0)
    assert draw_option({"a": 1.0, "b": 0.0}, rng, exclude="a") is None
    assert {draw_option({"a": 1.0, "b": 3.0, "c": 0.0}, rng) for _ in range(50)} == {"a", "b"}


def test_mutation_proposer_returns_an_unseen_child_of_a_parent():
    ctx = context(seen={KD.key, FITNETS.key})
    (candidate,) = MutationProposer().propose(ctx)
    assert candidate.proposer == "mutation" and candidate.parent in (0, 1)
    assert candidate.spec.key not in ctx.seen and candidate.mutated


def test_crossover_takes_each_unmutated_gene_from_one_parent():
    for seed in range(20):
        ctx = context(seed=seed, seen={KD.key, FITNETS.key})
        (candidate,) = CrossoverProposer().propose(ctx)
        a, b = (KD, FITNETS) if candidate.parent == 0 else (FITNETS, KD)
        assert {candidate.parent, candidate.second_parent} == {0, 1}
        for gene in GENES:
            if gene not in candidate.mutated:
                assert getattr(candidate.spec, gene) in (getattr(a, gene), getattr(b, gene))


def test_crossover_needs_two_parents():
    assert CrossoverProposer().propose(context(parents=(KD,))) == []


def test_random_proposer_finds_nothing_in_an_exhausted_space():
    space = SearchSpace().narrow(
        knowledge=["logit"], transform1=["no"], transform2=["no"], transform3=["no"],
        distance=["kl"], calibration=["no"], temperature=[4], magnitude=[1, 10],
    )
    ctx = context(space=space, seen={KD.key})
    (candidate,) = RandomProposer().propose(ctx)
    assert candidate.spec.magnitude == 10
    ctx.seen.add(candidate.spec.key)
    assert RandomProposer().propose(ctx) == []


def test_a_dropped_option_is_not_new():
    weights = uniform(SearchSpace())
    weights["knowledge"]["feat"] = 0.0
    assert not context(weights=weights).is_new(GOOD)
    assert context().is_new(GOOD)


# -- the predictor rho ----------------------------------------------------------------------


def test_predictor_shrinks_each_option_effect_toward_the_global_mean():
    rho = AdditivePredictor(shrinkage=1.0)
    assert rho.predict(KD) == 0.0
    rho.add(KD, 1.0)
    rho.add(FITNETS, 3.0)
    assert rho.mean == 2.0
    # kd and fitnets differ in 4 genes: the ridge fit gives each of those options a weight
    # -+1/(4 + m) (the deviation shared by the 4), the shared options none.
    assert rho.predict(KD) == pytest.approx(2.0 - 4 / 5)
    assert rho.predict(FITNETS) == pytest.approx(2.0 + 4 / 5)
    assert rho.predict(GOOD) == pytest.approx(2.0 + 3 / 5)
    unseen = DistillerSpec("emb", "relu", "no", "no", "cos", "focal", 8, 5)
    assert rho.predict(unseen) == pytest.approx(2.0)


def test_options_seen_only_together_share_their_trial_s_deviation():
    """One good random trial must not make each of its eight options look that good alone."""
    rho = AdditivePredictor()
    lucky = DistillerSpec("feat", "pow2", "norm_N", "batchnorm", "l2", "conf", 16, 0.01)
    other = DistillerSpec("emb", "logsoftmax_C", "sigmoid", "scale", "cos", "conf", 1, 100)
    observed = [(KD, 1.54), (FITNETS, 0.01), (lucky, 0.16), (other, 1.51)]
    for spec, y in observed:
        rho.add(spec, y)
    child = DistillerSpec("feat", "pow2", "norm_N", "batchnorm", "l2", "sim", 16, 0.01)
    lowest = min(y for _, y in observed)
    assert lowest < rho.predict(child) < rho.predict(KD)
    assert all(lowest <= rho.predict(spec) <= 1.54 for spec, _ in observed)


def test_rejection_probability_follows_the_options_of_rejected_trials():
    rho = AdditivePredictor()
    assert rho.reject_probability(KD) == 0.0
    for _ in range(4):
        rho.add_rejection(FITNETS)
        rho.add(KD, 1.0)
    rho.add(DistillerSpec("emb", "relu", "no", "no", "cos", "focal", 8, 5), 2.0)
    assert rho.reject_probability(FITNETS) > 0.5 > rho.reject_probability(KD)
    assert rho.reject_probability(GOOD) > rho.reject_probability(KD)
    assert rho.expected(FITNETS) > 1.5 > rho.expected(KD)


def test_predictor_ignores_the_order_of_trials_and_non_finite_scores():
    specs = [KD, FITNETS, GOOD]
    a, b = AdditivePredictor(), AdditivePredictor()
    for spec, y in zip(specs, [0.3, 0.9, 0.1]):
        a.add(spec, y)
    for spec, y in reversed(list(zip(specs, [0.3, 0.9, 0.1]))):
        b.add(spec, y)
    b.add(KD, float("inf"))
    assert all(a.predict(s) == pytest.approx(b.predict(s)) for s in specs)
    assert a.predict(GOOD) < a.predict(FITNETS)


def test_ridge_fit_updated_trial_by_trial_equals_the_ridge_solution_from_scratch():
    """Predictions between additions (Sherman-Morrison updates, options first seen late) equal
    the penalised least-squares solution computed directly from all the rows."""
    rng = np.random.default_rng(0)
    fit, rows, ys = RidgeFit(shrinkage=2.0), [], []
    for i in range(400):
        cells = [(gene, int(rng.integers(3 + 5 * (i > 200) + gene))) for gene in range(8)]
        y = float(rng.normal())
        fit.add(cells, y)
        rows.append(cells)
        ys.append(y)
        if i % 37 == 0 or i == 399:
            query = [(gene, int(rng.integers(9 + gene))) for gene in range(8)]
            columns = {cell: j + 1 for j, cell in enumerate(dict.fromkeys(c for r in rows for c in r))}
            x = np.zeros((len(rows), len(columns) + 1))
            x[:, 0] = 1.0
            for k, row in enumerate(rows):
                x[k, [columns[c] for c in row]] = 1.0
            penalty = np.diag([0.0] + [2.0] * len(columns))
            solution = np.linalg.solve(x.T @ x + penalty, x.T @ np.array(ys))
            expected = solution[0] + sum(solution[columns[c]] for c in query if c in columns)
            assert fit.predict(query) == pytest.approx(expected, abs=1e-9)


# -- parsing a model's reply ----------------------------------------------------------------


def test_parse_candidates_reads_json_only(tmp_path):
    one = GOOD.to_params()
    assert parse_candidates(json.dumps({"candidates": [one]})) == [one]
    assert parse_candidates("Sure!\n```json\n" + json.dumps([one]) + "\n```\nGood luck") == [one]
    assert parse_candidates("Here: " + json.dumps({"candidates": [one, "x"]}) + " done") == [one]
    marker = tmp_path / "pwned"
    for text in ["feat with l2 looks good", f"__import__('pathlib').Path('{marker}').touch()"]:
        with pytest.raises(ValueError):
            parse_candidates(text)
    assert not marker.exists()


# -- the language-model proposer against a local server --------------------------------------


class ChatServer:
    """A local OpenAI-compatible chat-completions endpoint with a scripted behaviour."""

    def __init__(self):
        self.mode = "ok"
        self.content = ""
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                server.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                if server.mode == "500":
                    self.send_error(500, "boom")
                    return
                if server.mode == "slow":
                    time.sleep(1.5)
                if server.mode == "not_chat":
                    payload = b'{"object": "error"}'
                elif server.mode == "html":
                    payload = b"<html>oops</html>"
                else:
                    message = {"role": "assistant", "content": server.content}
                    payload = json.dumps(
                        {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}
                    ).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, candidates):
        self.mode = "ok"
        self.content = json.dumps({"candidates": candidates})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = ChatServer()
    yield server
    server.close()


def llm(chat, **kwargs):
    return LLMProposer(chat.url, "test-model", KEY, **kwargs)


def test_llm_proposer_sends_population_and_space_and_keeps_new_valid_specs(chat, caplog):
    other = DistillerSpec("emb", "relu", "no", "no", "cos", "focal", 8, 5)
    chat.reply([GOOD.to_params(), KD.to_params(), other.to_params(), GOOD.to_params()])
    candidates = llm(chat).propose(context(seen={KD.key}))
    assert [c.spec for c in candidates] == [GOOD, other]
    assert all(c.proposer == "llm" and c.parent is None for c in candidates)
    (request,) = chat.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "test-model"
    sent = json.loads(request["body"]["messages"][-1]["content"])
    assert sent["options"]["knowledge"] == ["logit", "emb", "feat"]
    assert [m["params"] for m in sent["best_so_far"]] == [KD.to_params(), FITNETS.to_params()]
    assert not caplog.records


def test_llm_proposer_discards_invalid_candidates(chat):
    bad_value = {**GOOD.to_params(), "distance": "euclid"}
    extra_gene = {**GOOD.to_params(), "optimizer": "sgd"}
    missing = {g: v for g, v in GOOD.to_params().items() if g != "magnitude"}
    stringly = {**GOOD.to_params(), "temperature": "1"}
    ok = {**GOOD.to_params(), "magnitude": 25}
    chat.reply([bad_value, extra_gene, missing, stringly, ok, "feat"])
    (candidate,) = llm(chat).propose(context())
    assert candidate.spec.magnitude == 25


@pytest.mark.parametrize("mode, content, why", [
    ("ok", "I would try feature distillation with l2.", "unusable reply"),
    ("ok", json.dumps({"candidates": [{"knowledge": "feat"}]}), "no new valid distiller"),
    ("not_chat", "", "not a chat completion"),
    ("html", "", "unusable reply"),
    ("500", "", "HTTP 500"),
    ("slow", json.dumps({"candidates": [GOOD.to_params()]}), "timeout"),
])
def test_llm_failures_give_no_candidate_and_a_warning_without_the_key(
    chat, caplog, mode, content, why
):
    chat.mode, chat.content = mode, content
    with caplog.at_level(logging.WARNING, logger="kd_optuna.search.proposers"):
        assert llm(chat, timeout=0.5).propose(context()) == []
    (record,) = caplog.records
    assert why in record.getMessage().lower() or why in record.getMessage()
    assert KEY not in record.getMessage()


def test_an_unreachable_endpoint_gives_no_candidate(caplog):
    proposer = LLMProposer("http://127.0.0.1:9/v1", "m", KEY, timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="kd_optuna.search.proposers"):
        assert proposer.propose(context()) == []
    assert "127.0.0.1:9" in caplog.text and KEY not in caplog.text


def test_llm_settings_come_from_arguments_or_environment(monkeypatch):
    for name in ("KD_OPTUNA_LLM_URL", "KD_OPTUNA_LLM_MODEL", "KD_OPTUNA_LLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ProposerConfigError, match="KD_OPTUNA_LLM_URL"):
        LLMProposer()
    with pytest.raises(ProposerConfigError, match="KD_OPTUNA_LLM_MODEL"):
        LLMProposer("http://127.0.0.1:1/v1")
    with pytest.raises(ProposerConfigError, match="http"):
        LLMProposer("file:///etc/passwd", "m")
    monkeypatch.setenv("KD_OPTUNA_LLM_URL", "https://llm.example:8443/api/v1/")
    monkeypatch.setenv("KD_OPTUNA_LLM_MODEL", "small")
    monkeypatch.setenv("KD_OPTUNA_LLM_API_KEY", KEY)
    proposer = LLMProposer()
    assert proposer.url == "https://llm.example:8443/api/v1/chat/completions"
    assert proposer.model == "small"
    assert KEY not in repr(proposer) and KEY not in str(vars(proposer).get("url"))


def _score(spec: DistillerSpec) -> float:
    return (spec.knowledge != "feat") + 0.5 * (spec.distance != "l2") + 0.01 * spec.temperature


def test_a_study_with_the_llm_proposer_records_the_contest_and_survives_failures(chat):
    picks = [GOOD.to_params(), {**GOOD.to_params(), "magnitude": 25},
             {**GOOD.to_params(), "calibration": "focal"}]
    chat.reply(picks)
    # Warm-started with FitNets, rho knows feat + l2 is good, and each mutant redraws every
    # gene, so the model's picks (GOOD and its neighbours) can win contests.
    sampler = EvolutionSampler(
        population_size=4, warm_start=(FITNETS,), seed=0, crossover_prob=0.0,
        mutation_prob=1.0, proposer=llm(chat, timeout=5.0),
    )
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: _score(suggest_distiller(t)), n_trials=12)
    chat.mode = "500"
    study.optimize(lambda t: _score(suggest_distiller(t)), n_trials=4)
    contests = [read_lineage(t)["predictor"] for t in study.trials if "predictor" in read_lineage(t)]
    assert contests and all(set(c["rho"]) == {"mutation", "llm"} for c in contests)
    for c in contests:
        assert c["winner"] == ("llm" if c["rho"]["llm"] < c["rho"]["mutation"] else "mutation")
    winners = {read_lineage(t)["proposer"] for t in study.trials[4:]}
    assert "llm" in winners
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(read_lineage(t)["proposer"] == "mutation" for t in study.trials[-4:])
    stored = json.dumps([[t.user_attrs, t.system_attrs] for t in study.trials], default=str)
    assert KEY not in stored
    assert len(chat.requests) == 12


def test_threads_waiting_on_the_language_model_never_run_one_key_twice(chat):
    good = [{**GOOD.to_params(), "magnitude": m} for m in (100, 50, 25, 10, 5, 1)]
    chat.reply(good)
    # Warm-started with one of the replies, rho knows the model's picks are good, and the
    # mutated rival is a random spec (every gene redrawn), so the model's picks win contests
    # and three threads run them at once (rho ever preferring the mutant 20 times: 0 in 150).
    sampler = EvolutionSampler(
        population_size=4, warm_start=(KD, DistillerSpec.from_params(good[0])), seed=0,
        crossover_prob=0.0, mutation_prob=1.0, screen=1, proposer=llm(chat),
    )
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: _score(suggest_distiller(t)), n_trials=24, n_jobs=3)
    keys = [DistillerSpec.from_params(t.params).key for t in study.trials]
    assert len(keys) == 24 and len(set(keys)) == 24
    assert "llm" in {read_lineage(t)["proposer"] for t in study.trials}


def test_random_proposer_offers_distinct_new_candidates():
    candidates = RandomProposer(n_candidates=5).propose(context(seen={KD.key}))
    keys = [c.spec.key for c in candidates]
    assert len(keys) == 5 and len(set(keys)) == 5 and KD.key not in keys
    with pytest.raises(ProposerConfigError):
        RandomProposer(n_candidates=0)


def test_a_pickled_llm_proposer_holds_no_key_and_a_copy_keeps_it(monkeypatch):
    import copy
    import pickle

    monkeypatch.delenv("KD_OPTUNA_LLM_API_KEY", raising=False)
    proposer = LLMProposer("http://127.0.0.1:1/v1", "m", KEY)
    data = pickle.dumps(EvolutionSampler(proposer=proposer))
    assert KEY.encode() not in data
    assert pickle.loads(data).proposer._api_key is None
    monkeypatch.setenv("KD_OPTUNA_LLM_API_KEY", "from-env")
    assert pickle.loads(data).proposer._api_key == "from-env"
    assert copy.deepcopy(proposer)._api_key == KEY


def test_rejections_raise_the_expected_score_of_specs_sharing_their_options():
    rho = AdditivePredictor(shrinkage=1.0)
    rho.add(KD, 0.5)
    rho.add(FITNETS, 1.0)
    assert rho.reject_probability(GOOD) == 0.0 and rho.expected(GOOD) == rho.predict(GOOD)
    for magnitude in (1, 5, 25):
        rho.add_rejection(DistillerSpec("emb", "no", "no", "no", "cos", "no", 8, magnitude))
    risky = DistillerSpec("emb", "no", "no", "no", "cos", "no", 8, 10)
    assert rho.reject_probability(risky) > rho.reject_probability(KD)
    assert rho.expected(risky) > rho.predict(risky)
    assert rho.expected(KD) < rho.expected(risky)
