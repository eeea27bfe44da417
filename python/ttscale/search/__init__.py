"""Test-time search strategies over a forkable generator, with cost metering.

* Protocols and records (:mod:`.base`): ``Generator``, ``Verifier``, ``Budget``, ``Meter``,
  ``SearchResult``, ``Candidate``, ``StepEvent``.
* The per-depth decision (:mod:`.allocate`): ``allocate(scores, width, rule)`` and the estimators
  ``pass_at_k``, ``majority_probability``, ``ess``.
* Strategies (:mod:`.strategies`): ``BestOfN``, ``SelfConsistency``, ``BeamSearch``, ``DVTS``,
  ``Rebase``, ``ParticleFilter``, ``MCTS``; all with ``run(gen, prompt, budget, verifier, seed)``.
* ``ttscale.search.simulator``: a model-free generator and verifiers with closed forms (tests, demo).
* ``ttscale.search.engine_adapter``: the engine as a ``Generator``, the built-in PRM and a task's
  exact checker as ``Verifier`` s.
"""
from .allocate import RULES, allocate, ess, majority_probability, pass_at_k, softmax  # noqa: F401
from .base import (AGGREGATIONS, Budget, BudgetStop, Candidate, Generator, GenStats, Meter, SearchResult,  # noqa: F401
                   Step, StepEvent, Verifier, VerifierStats, aggregate, select_answer)
from .strategies import (DVTS, MCTS, STRATEGIES, BeamSearch, BestOfN, ParticleFilter, Rebase,  # noqa: F401
                         SelfConsistency)
from .verifiers import ExactVerifier  # noqa: F401
