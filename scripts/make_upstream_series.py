# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Make the series of patches that adds this package to Pyro, and optionally apply and test it.

The series is made against a Pyro source tree: by default the sdist of the installed
pyro-ppl version (fetched from PyPI with ``pip download --no-deps --no-binary :all:``
into a temporary directory), with Pyro's ``tests/`` from the pyro-tests kit
(``../shared/pyro-tests``) unpacked over it, since the sdist ships almost no tests and the
series edits some of Pyro's. :data:`SERIES` below says what each patch adds: our modules
as new Pyro files, our modules appended to existing Pyro files, names exported by
``pyro.infer``, documentation entries, our tests, and Pyro's test files that get our
classes added to their ELBO parametrizations.

The series is computed as a sequence of source trees: tree ``k`` holds everything the
first ``k`` patches add, and patch ``k`` is the difference between trees ``k - 1`` and
``k``. A test of ours lands in the first patch whose tree has everything it uses (its
file may be added by one patch and extended by later ones); a test that needs something
the series leaves out is dropped and listed. Every module is rewritten mechanically
(Pyro's license header, imports of ``pyro_markov_kl`` to their place in Pyro) and
formatted with the target tree's ruff configuration.

Usage::

    python scripts/make_upstream_series.py            # writes dist/upstream/
    python scripts/make_upstream_series.py --check    # and applies it patch by patch, lints, tests

See docs/upstreaming.rst.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import email.utils
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "pyro_markov_kl"
TESTS_DIR = REPO / "tests"
DEFAULT_OUTPUT = REPO / "dist" / "upstream"
DEFAULT_PYRO_TESTS = REPO.parent / "shared" / "pyro-tests"

OUR_PACKAGE = "pyro_markov_kl"
SUBPACKAGE = "pyro.infer.markov_kl"
SUBPACKAGE_DIR = "pyro/infer/markov_kl"
TESTS_SUBDIR = "tests/infer/markov_kl"


# ----------------------------------------------------------------------------------------
# The series
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchSpec:
    """
    One patch of the series.

    :ivar slug: the patch file's name after its number
    :ivar title: the subject line
    :ivar description: the pull-request text (what, why, how tested, what follows);
        the generated part (files, tests added, tests that follow) is appended to it
    :ivar modules: our module -> the new Pyro file it becomes
    :ivar moves: our module -> the existing Pyro file whose end it is appended to
        (its imports join the file's imports; its module docstring becomes the comment
        :attr:`move_comment` above it)
    :ivar exports: a name exported by ``pyro.infer`` -> the ``__all__`` entry it goes before
    :ivar docs: modules given an ``automodule`` entry in ``docs/source/inference_algos.rst``
    :ivar tests: our test module -> the Pyro test file it becomes (the tests of it that
        need a later patch are added by that patch)
    :ivar pyro_test_edits: Pyro test file -> {Pyro class: our class}: our class is added
        after the Pyro class in every ``pytest.mark.parametrize`` list of the file
    :ivar pyro_tests: further Pyro tests this patch touches, run by ``--check``: pytest
        arguments, e.g. ``"tests/distributions/test_kl.py"`` or ``"path -k expression"``
    """

    slug: str
    title: str
    description: str
    modules: Mapping[str, str] = field(default_factory=dict)
    moves: Mapping[str, str] = field(default_factory=dict)
    move_comment: str = ""
    exports: Mapping[str, str] = field(default_factory=dict)
    docs: Tuple[str, ...] = ()
    tests: Mapping[str, str] = field(default_factory=dict)
    pyro_test_edits: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    pyro_tests: Tuple[str, ...] = ()


def _sub(*names: str) -> Dict[str, str]:
    """Our modules that go to ``pyro/infer/markov_kl/<same name>.py``."""
    return {n: f"{SUBPACKAGE_DIR}/{n}.py" for n in names}


def _tests(*names: str) -> Dict[str, str]:
    """Our test modules that go to ``tests/infer/markov_kl/<same name>.py``."""
    return {n: f"{TESTS_SUBDIR}/{n}.py" for n in names}


ELBO_EDITS = {"TraceMeanField_ELBO": "TraceMarkovKL_ELBO"}
JIT_ELBO_EDITS = {**ELBO_EDITS, "JitTraceMeanField_ELBO": "JitTraceMarkovKL_ELBO"}

SERIES: Tuple[PatchSpec, ...] = (
    PatchSpec(
        slug="kl-divergences",
        title="Add closed-form KL divergences for more pairs and a per-site KL lookup",
        modules={"kl_rule": "pyro/distributions/kl_rule.py", **_sub("kl", "batched_kl")},
        moves={"kl_pairs": "pyro/distributions/kl.py"},
        move_comment="Closed forms for the pairs of autoguides, plates and transforms\n"
        "(replacing Pyro's (Independent, Independent) and (Independent, MultivariateNormal)).",
        tests=_tests("test_kl", "test_batched_kl"),
        pyro_tests=(
            "tests/distributions/test_kl.py",
            "tests/infer/test_gradient.py -k 'test_subsample_gradient and MeanField "
            "and not sequential'",
        ),
        description="""\
What:

* pyro/distributions/kl.py registers, with torch.distributions.kl.register_kl,
  closed forms for Independent(Normal) against MultivariateNormal and
  LowRankMultivariateNormal and back, LowRankMultivariateNormal against
  MultivariateNormal, Independent against Independent with any
  reinterpreted_batch_ndims, TransformedDistribution pairs with matching
  transforms, a TransformedDistribution whose transforms are identities or
  one affine map of a Normal (as AutoNormalMessenger builds) against any
  distribution, ExpandedDistribution on either side, and Delta against
  ExpandedDistribution. Pyro's (Independent, Independent) and (Independent,
  MultivariateNormal) functions are replaced by ones that return the same
  value wherever those return one, as are torch's
  (LowRankMultivariateNormal, MultivariateNormal) and
  (TransformedDistribution, TransformedDistribution). Composite functions
  compute the KL of their parts with kl_divergence, so a pair registered by
  anyone applies inside Independent, ExpandedDistribution and
  TransformedDistribution.
* pyro/distributions/kl_rule.py: KLRule and KLDivergenceError, and the scope
  in which an ELBO's own rules (kl_rules={(TypeQ, TypeP): fn}) are tried
  before torch's registry without changing it.
* pyro/infer/markov_kl/kl.py: find_kl_rule(q, p) finds the function for one
  site's pair and says where it comes from (the ELBO's rules, torch's
  registry, the Delta rule, a Gaussian fallback through MultivariateNormal)
  or why there is none; compute_kl evaluates it with the checks an ELBO
  needs (shape, finite values, errors that name the site and the rule).
  pyro/infer/markov_kl/batched_kl.py stacks the distributions of sites with
  the same structure (the time steps of a Markov chain) for one KL call.

Why: every user of kl_divergence gets the closed forms at once,
TraceMeanField_ELBO included: an AutoNormal guide (an Independent(Normal))
against a MultivariateNormal or LowRankMultivariateNormal prior, or
distributions expanded by plates, no longer raise NotImplementedError.
TraceMarkovKL_ELBO (patch 4) looks up and explains the KL of each site.

How tested: each closed form against a Monte Carlo estimate of
E_q[log q - log p] (within 5 standard errors) and against autograd
gradients; the replaced functions against the ones they replace; the
lookup's precedence, ambiguity and errors; stacked KLs against per-site
KLs. Pyro's tests/distributions/test_kl.py and the TraceMeanField_ELBO
cases of test_subsample_gradient still pass. The tests of these files that
go through the ELBO follow in patch 4.

What follows: dispatch-level provenance (patch 2), the dependency analysis
(patch 3), TraceMarkovKL_ELBO (patch 4).""",
    ),
    PatchSpec(
        slug="dispatch-provenance",
        title="Add dispatch-level provenance tracking: pyro.ops.dispatch_provenance",
        modules={"provenance": "pyro/ops/dispatch_provenance.py"},
        tests=_tests("test_dependencies"),
        description="""\
What: pyro/ops/dispatch_provenance.py. DependencyTracker is a TorchDispatchMode
that records, for every tensor computed while it is active, which tagged tensors
(sampled values) its value may depend on. It works at the level of ATen
operators, so it sees every operation whatever Python or C++ code issued it
(nn.GRU and packed sequences, einsum, gather, torch.where and comparisons,
.detach() and torch.no_grad regions alike); a write into an argument (copy_,
index_put_, buf[:, t] = z, out=) taints the written storage; a value that leaves
the tensor world (.item(), .numpy(), bool()) is recorded as an escape.
reachable_tensors(obj) lists the tensors reachable from a Python object
(closures, partials, modules), for the parameters a callable captures.

Why a new module rather than pyro/ops/provenance.py: pyro.ops.provenance
tracks provenance with a tensor subclass (ProvenanceTensor, through
__torch_function__) that the program must carry, and which loses in-place
writes into plain buffers; it is imported by pyro.nn.module, so by every
`import pyro`. The dispatch-level tracker watches an unmodified program,
needs torch's private dispatch-mode API (torch.utils._python_dispatch), and is
imported only by the dependency analysis that uses it (patch 3). Keeping the
two apart keeps that API out of `import pyro` and leaves the choice between
them, for pyro.infer.inspect.get_dependencies too, to a later change.

How tested: tests/infer/markov_kl/test_dependencies.py: sixteen kinds of data
flow are tracked, value-independent factories (zeros_like, ...) carry no
dependency, escapes are recorded, closures and partials are reachable. The
tests of that file that go through the ELBO follow in patch 4.

What follows: TraceMarkovKL_ELBO's dependency analysis (patch 3) runs the model
and the guide under the tracker.""",
    ),
    PatchSpec(
        slug="markov-kl-dependency-analysis",
        title="Add the dependency analysis and site records behind TraceMarkovKL_ELBO",
        modules=_sub("dependencies", "guide_messenger", "sites", "records", "plan_cache"),
        tests=_tests("test_no_side_effects"),
        description="""\
What: the analysis stage of TraceMarkovKL_ELBO (patch 4), in
pyro/infer/markov_kl/, with no estimator yet:

* dependencies.py: analyse_dependencies runs the guide, then the model on the
  guide's replayed samples, under the dispatch-level tracker of patch 2, and
  returns for every sample site the sites its distribution depends on, in the
  guide and in the model (ProgramDependencies); isolated_analysis runs it
  outside any JIT trace, without validation or autograd, and under
  no_side_effects, which undoes what the extra run changes (random number
  generators, module buffers such as BatchNorm's running statistics, the
  param store).
* guide_messenger.py: the same analysis for guides that are GuideMessengers
  (AutoNormalMessenger, AutoRegressiveMessenger, user subclasses), which run
  the model inside the guide: one run, two trackers.
* sites.py: which sample sites count and how, read off the traces (the
  per-site option infer={"kl": ...}, reparameterization, the model/guide
  consistency checks), and site_factors, which takes a site's distribution
  apart into a bare distribution, its scale and its mask.
* records.py: SiteRecord and Plan, the decisions for one site and for one
  model/guide structure, with the table print(plan) shows (exported by
  pyro.infer.markov_kl).
* plan_cache.py: the key of a model/guide structure (structure_key: the
  sites, their distribution types, shapes, plates and options; argument_key:
  the call's non-tensor arguments, such as a flag that rewires the guide) and
  PlanCache, a least-recently-used cache of plans that re-analyses a step at a
  few uses of a plan and warns (StalePlanWarning) when the decisions changed
  behind an equal key.

Why a patch of its own: with the estimator these modules would make one
patch of over 5000 lines. They are the part of the ELBO that reads a
program, and can be reviewed without the estimator: which data flow counts
as a dependency, what the analysis may change in the program's state, what a
plan records and what it is keyed on. Nothing outside pyro.infer.markov_kl
imports them yet, so `import pyro` is unchanged.

How tested: tests/infer/markov_kl/test_no_side_effects.py checks that
no_side_effects restores reassigned buffers and removes parameters created
inside it. The rest of this stage is tested through the ELBO, since its input
is a model and guide run by the ELBO: its tests follow in patch 4 (the plan,
the state a step leaves, new plans for new structures) and patch 5
(GuideMessenger guides, escapes, cached plans that go stale, bad input).

What follows: TraceMarkovKL_ELBO, which builds its per-site plan from this
analysis (patch 4).""",
    ),
    PatchSpec(
        slug="trace-markov-kl-elbo",
        title="Add TraceMarkovKL_ELBO: per-site analytic KL where it is unbiased",
        modules={
            **_sub("terms", "score_function", "plan"),
            "trace_markov_kl_elbo": "pyro/infer/trace_markov_kl_elbo.py",
        },
        exports={
            "JitTraceMarkovKL_ELBO": "JitTraceMeanField_ELBO",
            "TraceMarkovKL_ELBO": "TraceMeanField_ELBO",
        },
        docs=("pyro.infer.trace_markov_kl_elbo", SUBPACKAGE),
        tests={
            "test_elbo": "tests/infer/test_trace_markov_kl_elbo.py",
            **_tests("test_overrides_and_errors", "test_score_function", "test_batched_observed"),
        },
        pyro_test_edits={
            "tests/infer/test_gradient.py": JIT_ELBO_EDITS,
            "tests/infer/test_valid_models.py": ELBO_EDITS,
            "tests/infer/test_jit.py": JIT_ELBO_EDITS,
        },
        description="""\
What: TraceMarkovKL_ELBO and JitTraceMarkovKL_ELBO, exported by pyro.infer,
with the same constructor arguments as Trace_ELBO. Like Trace_ELBO it estimates
the ELBO from samples of the guide; for every latent site s it replaces the
Monte Carlo term log p(z_s | ...) - log q(z_s | ...) by -KL(q_s || p_s),
conditioned on the sampled parents, wherever that is unbiased: when no model
parent of s is a guide descendant of s. (If one were, the model's distribution
at s would depend on z_s through it, and the KL would not be the expectation of
the Monte Carlo term.) Elsewhere it is Trace_ELBO. TraceMeanField_ELBO uses the
KL at every site, which is biased for guides that are not mean field, and
Trace_ELBO never uses it.

Which sampled values flow into which distribution is found by the dependency
analysis of patch 3, once per model/guide structure: plan.py turns it into the
per-site decisions (the plan), cached by patch 3's PlanCache; terms.py computes
each site's term (the KL, with the site's scale and mask, stacked over the
steps of a chain where the distributions allow). Also:

* infer={"kl": "auto" | "mc" | "analytic"} per site; "analytic" is refused
  where it would be biased;
* explain(model, guide, *args) returns the plan: for each site its estimator,
  guide and model parents, and the reason;
* non-reparameterized sites get TraceGraph_ELBO's score-function terms
  (score_function.py), with costs that follow the dependencies across plates,
  and a leave-one-out baseline (the mean cost of the other elements of the
  site's plates) where that is unbiased, unless the site has its own
  infer={"baseline": ...};
* guides that are GuideMessengers (AutoNormalMessenger, ...) are analysed too.

Why: in state-space models and the Deep Markov Model, the per-step KL removes
most of the variance of the ELBO and its gradient while staying unbiased for
guides that are not mean field (e.g. a guide that runs backward in time, where
TraceMeanField_ELBO is biased).

Why the score-function support is in this patch: the plan decides per site
between the analytic KL, the Monte Carlo term and the score-function terms, and
builds the downstream costs and baselines of the non-reparameterized sites as
part of the same pass; and the Pyro tests this patch extends run every ELBO of
their lists on non-reparameterized sites (test_gradient.py's
test_subsample_gradient with fakes.NonreparameterizedNormal, the discrete sites
of test_valid_models.py), so an ELBO without it could not join them.

How tested: TraceMarkovKL_ELBO (and its JIT twin where Pyro lists
JitTraceMeanField_ELBO) joins TraceMeanField_ELBO in the ELBO parametrizations
of tests/infer/test_gradient.py, test_valid_models.py and test_jit.py (so
on non-reparameterized sites, subsampled plates and under the JIT too). New
tests, listed below: the estimator against Trace_ELBO and
TraceMeanField_ELBO, the per-site options and explain(), exact gradients of
the score-function terms and TraceGraph_ELBO's values with plates and masks,
and the tests of patches 1 to 3 that go through the ELBO. The tests of the
analysis, the plan cache, the JIT twin, the baselines and bad input follow in
patch 5, the statistical and reference tests in patches 6 and 7.

What follows: tests (patches 5 to 7); TraceEnumMarkovKL_ELBO (patch 8).""",
    ),
    PatchSpec(
        slug="trace-markov-kl-elbo-analysis-tests",
        title="Test TraceMarkovKL_ELBO's analysis, plan cache, JIT twin, baselines and errors",
        tests=_tests(
            "test_guide_messenger",
            "test_escapes",
            "test_plan_staleness",
            "test_baselines",
            "test_jit",
            "test_bad_input",
        ),
        description="""\
What: tests only, of what TraceMarkovKL_ELBO (patch 4) does besides its
estimator, most of it the dependency analysis and plan cache of patch 3:

* test_guide_messenger.py: the plan of GuideMessenger guides
  (AutoNormalMessenger, ...), whose model runs inside the guide, and their
  loss and gradients against Trace_ELBO and the evidence;
* test_escapes.py: a sampled value that leaves torch's dispatcher (memory
  shared with numpy, dlpack) keeps its dependency or is handled
  conservatively; a computation in another thread is not seen (a documented
  limitation, tested so that the docs follow if it changes);
* test_plan_staleness.py: a new plan when a transform, a flag argument
  (positional or keyword), a mutated configuration object, the kl_rules or
  the baseline option rewire the program; a StalePlanWarning when a switch
  outside the key changes the structure; none for a stable program;
* test_baselines.py: the leave-one-out baseline's values (with masks), the
  plates it is taken over, and unbiasedness against TraceGraph_ELBO and
  Trace_ELBO, under the JIT too, and where a baseline over a plate would be
  biased;
* test_jit.py: JitTraceMarkovKL_ELBO compiles once per structure, matches the
  eager ELBO's loss and gradients for the same draw, emits no tracer
  warnings, and does not write to the param store;
* test_bad_input.py: missing and inconsistent sites, wrong shapes, NaN and
  infinite KLs, unknown options: an error that names the site and the
  problem; determinism for a seed; new plans for a changing structure.

Why separate: with the ELBO these tests would make a patch of over 3000
lines; they check the parts around the estimator, which patch 4's own tests
and Pyro's parametrized tests exercise only through it.

How tested: they pass on patch 4.

What follows: tests against exact ELBOs (patch 6) and recorded reference
programs (patch 7), TraceEnumMarkovKL_ELBO (patch 8).""",
    ),
    PatchSpec(
        slug="trace-markov-kl-elbo-exact-tests",
        title="Test TraceMarkovKL_ELBO against exact ELBOs and Trace_ELBO",
        tests=_tests("test_closed_form", "test_property_plates", "test_drop_in"),
        description="""\
What: tests only. test_closed_form.py compares the loss and gradients of
TraceMarkovKL_ELBO with the exact ELBO of linear-Gaussian state-space models
(linear_gaussian.py computes it in closed form), for forward and backward
guides, scales, masks and per-site overrides, and checks that the harness
would catch an estimator that ignored a dependency; test_property_plates.py
checks unbiasedness against a plate-free Trace_ELBO over generated plate
structures (and that dropping the plate sums makes the comparison fail);
test_drop_in.py checks that the class behaves as Trace_ELBO where
Trace_ELBO's behaviour is the contract (factors, deterministic sites,
observed guide sites, auxiliary guide sites, warnings, shape errors,
autoguides).

Why separate: patch 4 is large; these tests add confidence in its estimator
without adding code, and can be reviewed, or moved to Pyro's integration
stage, on their own.

How tested: they pass on patch 5; test_closed_form.py and
test_property_plates.py take a few minutes together.

What follows: tests against recorded reference programs (patch 7),
TraceEnumMarkovKL_ELBO (patch 8).""",
    ),
    PatchSpec(
        slug="trace-markov-kl-elbo-recorded-tests",
        title="Test TraceMarkovKL_ELBO with dependencies through recorded values",
        tests=_tests("test_recorded_values", "test_property_recorded"),
        description="""\
What: tests only. A latent that reaches a later site only through a value
recorded at a site (pyro.deterministic, an observation at a value computed
from it) or through a factor a handler scales or masks a site by
(poutine.scale, poutine.mask) is a dependency like any other: the
score-function costs include the terms it reaches, and the analytic KL is not
used where such a hidden model parent is a guide descendant.
test_recorded_values.py has a hand-written program of each kind;
test_property_recorded.py draws random programs of these families
(recorded.py builds them, with exact ELBOs where they exist), including
guide edges and transforms switched by call arguments, and checks the
estimator against the exact value or Trace_ELBO.

Why separate: as patch 6, confidence without code; the program generator is
a long file of its own.

How tested: they pass on patch 6; test_property_recorded.py takes a few
minutes.

What follows: TraceEnumMarkovKL_ELBO (patch 8).""",
    ),
    PatchSpec(
        slug="trace-enum-markov-kl-elbo",
        title="Add TraceEnumMarkovKL_ELBO: TraceEnum_ELBO with per-site analytic KL",
        modules={
            **_sub("enum_plan"),
            "trace_enum_markov_kl_elbo": "pyro/infer/trace_enum_markov_kl_elbo.py",
        },
        exports={
            "JitTraceEnumMarkovKL_ELBO": "JitTraceGraph_ELBO",
            "TraceEnumMarkovKL_ELBO": "TraceEnum_ELBO",
        },
        docs=("pyro.infer.trace_enum_markov_kl_elbo",),
        tests=_tests("test_enum", "test_jit_enum", "test_real_programs"),
        description="""\
What: TraceEnumMarkovKL_ELBO and JitTraceEnumMarkovKL_ELBO, exported by
pyro.infer: TraceEnum_ELBO, with the analytic KL of TraceMarkovKL_ELBO
substituted inside its own computation for every latent site sampled (not
enumerated) in the guide whose model factor involves no site enumerated in the
model and whose KL is unbiased by the rule of patch 4. The model site's packed
log_prob becomes -f_p (KL + H) (or -f_p KL where the scales agree) and the
guide site's -f_q H (or zero), with the site's own plate and enumeration
dimensions; where q_s depends on a site enumerated in the guide, the KL carries
that enumeration dimension and TraceEnum_ELBO's weighting makes its expectation
exact. Everything else (the enumerated sums, the DiCE weights, plates,
pyro.markov contraction, linear in the length of the chain) is TraceEnum_ELBO's.

Why: models with discrete states and continuous dynamics (switching
state-space models, HMMs with Gaussian emissions in the guide) combine
enumeration with the per-step KL.

How tested: tests/infer/markov_kl/test_enum.py against TraceEnum_ELBO and exact
sums; test_jit_enum.py; test_real_programs.py (a DMM with masks and
enumeration).

What follows: nothing in this series; the class could join the
parametrizations of Pyro's tests/infer/test_enum.py.""",
    ),
)

#: Package modules that stay in pyro-markov-kl, with the reason.
LEFT_OUT_MODULES = {
    "compare": "the ELBO comparison tool (a pyro-markov-kl utility with a CLI)",
    "examples": "the examples (DMM, switching state-space model, comparison scripts)",
    "data": "the bundled JSB Chorales data and its loaders",
}
#: Our test helper modules (imported by the tests as top-level modules) -> Pyro path.
#: A helper is added by the first patch whose tests use it.
TEST_HELPERS = {
    "lg": f"{TESTS_SUBDIR}/linear_gaussian.py",
    "lg_discrete": f"{TESTS_SUBDIR}/linear_gaussian_discrete.py",
    "helpers": f"{TESTS_SUBDIR}/helpers.py",
    "programs": f"{TESTS_SUBDIR}/programs.py",
    "recorded": f"{TESTS_SUBDIR}/recorded.py",
}
#: Test modules left out entirely, with the reason.
LEFT_OUT_TESTS = {
    "test_dmm_options": "tests the options of the bundled DMM example",
    "test_data": "tests the bundled JSB Chorales data (pyro_markov_kl.data)",
    "test_example_dmm": "runs the bundled DMM example on the bundled data",
    "test_compare": "tests pyro_markov_kl.compare and the DMM comparison example",
    "test_layout": "checks this repository's import graph (scripts/import_graph.py)",
    "test_distributed": "trains the bundled DMM on the bundled data with torch.distributed",
    "test_property": "needs hypothesis, which is not one of Pyro's test dependencies",
    "test_property_discrete": "needs hypothesis, which is not one of Pyro's test dependencies",
}
#: Single tests left out, with the reason: ``<our test module>::<test>`` -> why.
LEFT_OUT_TEST_FUNCTIONS: Dict[str, str] = {
    "test_kl::test_dispatch_of_torch_and_pyro_pairs_unchanged": (
        "compares torch's dispatch before and after the built-in pairs are registered; in "
        "Pyro they are registered by pyro.distributions.kl itself, so the test always skips"
    ),
}
#: Modules that no patch provides: a test that imports one is left out (and listed).
NEVER_AVAILABLE = (
    "pyro_markov_kl.examples",
    "pyro_markov_kl.data",
    "pyro_markov_kl.compare",
    "hypothesis",
)
#: Tests whose source mentions one of these need funsor: marked ``requires_funsor``.
FUNSOR_WORDS = ("funsor",)

DOCS_PATH = "docs/source/inference_algos.rst"
DOCS_OPTIONS = (
    "    :members:\n    :undoc-members:\n    :show-inheritance:\n    :member-order: bysource\n"
)
#: Documentation entries go before this line (the ELBO section: trace_elbo,
#: tracegraph_elbo, traceenum_elbo, trace_mean_field_elbo, then trace_tail_adaptive_elbo).
DOCS_ANCHOR = ".. automodule:: pyro.infer.trace_tail_adaptive_elbo\n"
#: Without the docs file (sdists do not ship docs/), its hunks are made from the lines
#: around DOCS_ANCHOR in Pyro's docs/source/inference_algos.rst, where the anchor is
#: line 42; ``git apply`` finds a hunk at another line number too.
DOCS_CONTEXT = (
    "    :show-inheritance:\n",
    "    :member-order: bysource\n",
    "\n",
    DOCS_ANCHOR,
    "    :members:\n",
    "    :undoc-members:\n",
)
DOCS_ANCHOR_LINE = 42

OUR_HEADER = re.compile(
    r"\A# SPDX-FileCopyrightText: [^\n]*\n# SPDX-License-Identifier: Apache-2.0\n"
)
PYRO_HEADER = (
    "# Copyright Contributors to the Pyro project.\n# SPDX-License-Identifier: Apache-2.0\n"
)
#: What Pyro's ``scripts/update_headers.py --check`` accepts as a file's first lines.
PYRO_HEADERS = (
    PYRO_HEADER,
    "# Copyright (c) 2017-2019 Uber Technologies, Inc.\n# SPDX-License-Identifier: Apache-2.0\n",
)

#: Text rewrites applied after the imports are rewritten: (pattern, replacement).
TEXT_REWRITES = (
    (
        r"\bpyro_markov_kl\.(JitTraceMarkovKL_ELBO|TraceMarkovKL_ELBO)\b",
        r"pyro.infer.trace_markov_kl_elbo.\1",
    ),
    (
        r"\bpyro_markov_kl\.(JitTraceEnumMarkovKL_ELBO|TraceEnumMarkovKL_ELBO)\b",
        r"pyro.infer.trace_enum_markov_kl_elbo.\1",
    ),
    (r"\bpyro_markov_kl\b", SUBPACKAGE),
    (r"\btests/lg\.py\b", TEST_HELPERS["lg"]),
    (r"`lg\.", "`tests.infer.markov_kl.linear_gaussian."),
)

#: What ``--check`` skips unless ``--full`` (besides the tests our repository marks
#: ``slow``): whole test modules, and tests by name (ours and Pyro's), the slowest ones
#: under Pyro's configuration (float64), so that the check stays within a few minutes.
QUICK_SKIP_FILES = ("test_closed_form", "test_property_recorded", "test_property_plates")
QUICK_SKIP_TESTS = (
    "test_compiles_once_and_matches_eager",
    "test_forward_guide_has_lower_variance_than_trace_elbo",
    "test_svi_trains",
    "test_nonlinear_dmm_matches_trace_elbo",
    "test_switch_outside_the_key_is_detected",
    "test_new_sequence_length_compiles_a_new_graph",
    "test_sizeless_plate_gets_leave_one_out_baseline",
    "test_subsample_gradient_sequential",  # Pyro's, 5000 particles one by one
)
#: Pyro test directories whose conftest.py imports a module beyond our test dependencies:
#: a ``pyro_tests`` run there is skipped (and said) where the module is not installed.
PYRO_TEST_REQUIRES = {"tests/distributions/": "scipy"}
#: Tests known to fail in Pyro's test configuration, deselected by ``--check`` (and
#: reported) until fixed here: Pyro test id -> why.
KNOWN_FAILURES: Dict[str, str] = {}


class UpstreamError(RuntimeError):
    """A problem the user must fix; printed without a traceback."""


def log(message: str) -> None:
    """Print a progress message to stderr."""
    print(f"[upstream] {message}", file=sys.stderr, flush=True)


def module_name(path: str) -> str:
    """``pyro/infer/x.py`` -> ``pyro.infer.x``."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


# ----------------------------------------------------------------------------------------
# Where everything goes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where one of our modules goes: added by patch ``patch`` (1-based) as ``path``."""

    patch: int
    path: str
    moved: bool

    @property
    def module(self) -> str:
        return module_name(self.path)


def placements() -> Dict[str, Placement]:
    """Our module -> its place in Pyro, from :data:`SERIES`."""
    result: Dict[str, Placement] = {}
    for k, spec in enumerate(SERIES, 1):
        for table, moved in ((spec.modules, False), (spec.moves, True)):
            for ours, path in table.items():
                if ours in result:
                    raise UpstreamError(f"{ours} is placed by two patches")
                result[ours] = Placement(k, path, moved)
    return result


PLACEMENTS = placements()
#: Name exported by pyro.infer -> the patch that exports it.
INFER_EXPORTS = {name: k for k, spec in enumerate(SERIES, 1) for name in spec.exports}
#: Our test module -> (patch that adds the file, Pyro path).
TEST_FILES = {
    stem: (k, path) for k, spec in enumerate(SERIES, 1) for stem, path in spec.tests.items()
}


def root_exports() -> Dict[str, str]:
    """Name exported by ``pyro_markov_kl`` -> our module that defines it."""
    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8"))
    return {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for alias in node.names
    }


ROOT_EXPORTS = root_exports()


def never_available(module: str) -> bool:
    """Whether no patch provides ``module``."""
    return any(module == m or module.startswith(m + ".") for m in NEVER_AVAILABLE)


def absolute_module(module: Optional[str], level: int, package: Optional[str]) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module or ""
    if package is None:
        raise UpstreamError(f"relative import {'.' * level}{module or ''} outside the package")
    parts = package.split(".")
    if level > 1:
        parts = parts[: -(level - 1)]
    return ".".join(parts + ([module] if module else []))


def alias_text(alias: ast.alias) -> str:
    """``name`` or ``name as asname``."""
    return alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"


@dataclass
class TreeState:
    """What the tree after patch ``k`` holds, as far as imports are concerned."""

    k: int
    #: test-side module (helper or test) -> names it binds at this state
    test_names: Dict[str, set] = field(default_factory=dict)

    def locate(self, module: str, name: str) -> Tuple[Optional[str], str]:
        """
        Where ``from <module> import <name>`` imports from at this state.

        :returns: ``(pyro_module, "")``, ``(None, why not)`` when not available, or
            ``("", "")`` for a module that is not ours (left as it is)
        """
        if never_available(module):
            return None, f"needs {module}, which stays in pyro-markov-kl"
        if module in TEST_HELPERS or module in TEST_FILES:
            path = TEST_HELPERS.get(module) or TEST_FILES[module][1]
            if name in self.test_names.get(module, ()):
                return module_name(path), ""
            return None, f"needs {module_name(path)}.{name}"
        if module == OUR_PACKAGE:
            if name not in ROOT_EXPORTS:
                return None, f"needs {OUR_PACKAGE}.{name}, which is not in this series"
            if name in INFER_EXPORTS:
                k = INFER_EXPORTS[name]
                if k > self.k:
                    return None, f"needs pyro.infer.{name} (patch {k})"
                return "pyro.infer", ""
            module = f"{OUR_PACKAGE}.{ROOT_EXPORTS[name]}"
            if never_available(module):
                return None, f"needs {module}, which stays in pyro-markov-kl"
        if module != OUR_PACKAGE and not module.startswith(OUR_PACKAGE + "."):
            return "", ""
        first = module[len(OUR_PACKAGE) + 1 :].split(".")[0]
        if first not in PLACEMENTS:
            raise UpstreamError(
                f"import from {module}, which no patch of the series adds; add it to SERIES "
                f"or LEFT_OUT_MODULES in {Path(__file__).name}"
            )
        place = PLACEMENTS[first]
        if place.patch > self.k:
            return None, f"needs {place.module} (patch {place.patch})"
        return place.module, ""


# ----------------------------------------------------------------------------------------
# Import and text rewriting
# ----------------------------------------------------------------------------------------


def rewrite_imports(text: str, package: Optional[str], state: TreeState, what: str) -> str:
    """
    Rewrite every import of our package and test helpers (also lazy imports inside
    functions) to its place in Pyro, one ``from ... import ...`` statement per target
    module.

    :param package: the package the module belongs to, for relative imports
    :raises UpstreamError: for an import of something the tree does not hold yet
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if alias.name in TEST_HELPERS and len(node.names) == 1:
                    # import lg -> import tests.infer.markov_kl.linear_gaussian as lg
                    helper = module_name(TEST_HELPERS[alias.name])
                    new = f"import {helper} as {alias.asname or alias.name}"
                    begin = starts[node.lineno - 1] + node.col_offset
                    edits.append((begin, starts[node.end_lineno - 1] + node.end_col_offset, new))
                elif top == OUR_PACKAGE or top in TEST_HELPERS or top in TEST_FILES:
                    raise UpstreamError(
                        f"{what}: 'import {alias.name}' (line {node.lineno}) is not supported; "
                        "use 'from ... import ...'"
                    )
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        module = absolute_module(node.module, node.level, package)
        targets: Dict[str, List[str]] = {}
        for alias in node.names:
            target, why = state.locate(module, alias.name)
            if target is None:
                raise UpstreamError(
                    f"{what} (patch {state.k}) {why}: reorder SERIES or move the import"
                )
            if target:
                targets.setdefault(target, []).append(alias_text(alias))
        if not targets:
            continue
        if len(targets) > 1 or next(iter(targets)) != module or node.level:
            for lineno in range(node.lineno, node.end_lineno + 1):
                if not lines[lineno - 1].isascii():
                    raise UpstreamError(f"{what}: non-ASCII import statement at line {lineno}")
            indent = " " * node.col_offset
            new = ("\n" + indent).join(
                f"from {m} import {', '.join(ns)}" for m, ns in targets.items()
            )
            begin = starts[node.lineno - 1] + node.col_offset
            end = starts[node.end_lineno - 1] + node.end_col_offset
            edits.append((begin, end, new))
    for begin, end, new in sorted(edits, reverse=True):
        text = text[:begin] + new + text[end:]
    return text


def rewrite_text(text: str) -> str:
    """
    Rename what the import rewriting cannot see (strings, docstrings, comments):
    ``pyro_markov_kl.<module>`` to the module's place in Pyro, then :data:`TEXT_REWRITES`.
    """
    for ours in sorted(PLACEMENTS, key=len, reverse=True):
        text = re.sub(rf"\bpyro_markov_kl\.{ours}\b", PLACEMENTS[ours].module, text)
    for pattern, replacement in TEXT_REWRITES:
        text = re.sub(pattern, replacement, text)
    return text


def pyro_header(text: str, what: str) -> str:
    """Replace our SPDX header by Pyro's."""
    if not OUR_HEADER.match(text):
        raise UpstreamError(f"{what} does not start with the SPDX header")
    return OUR_HEADER.sub(PYRO_HEADER, text, count=1)


def convert_module(name: str, state: TreeState) -> str:
    """One of our package modules, as it goes into Pyro."""
    path = PACKAGE_DIR / f"{name}.py"
    text = pyro_header(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    return rewrite_text(rewrite_imports(text, OUR_PACKAGE, state, f"pyro_markov_kl/{name}.py"))


SUBPACKAGE_DOC = """\
This subpackage holds the dependency analysis, the estimator plan and the KL rules of
:class:`~pyro.infer.trace_markov_kl_elbo.TraceMarkovKL_ELBO`, which is exported by
:mod:`pyro.infer`."""


def subpackage_init(state: TreeState) -> Optional[str]:
    """
    ``pyro/infer/markov_kl/__init__.py`` at this state: our ``__init__``'s exports from the
    subpackage modules the tree holds, or ``None`` while it holds none.
    """
    present = [
        n
        for n, p in PLACEMENTS.items()
        if p.patch <= state.k and p.path.startswith(SUBPACKAGE_DIR + "/")
    ]
    if not present:
        return None
    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree, clean=False) or "pyro-markov-kl"
    all_names: List[str] = []
    lines = [PYRO_HEADER, "\n", f'"""\n{doc.strip()}\n\n{SUBPACKAGE_DOC}\n"""\n', "\n"]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in present:
            names = [alias_text(a) for a in node.names]
            lines.append(f"from {PLACEMENTS[node.module].module} import {', '.join(names)}\n")
            all_names += [a.asname or a.name for a in node.names]
    lines.append("\n__all__ = [\n")
    lines += [f'    "{n}",\n' for n in sorted(all_names)]
    lines.append("]\n")
    return "".join(lines)


# ----------------------------------------------------------------------------------------
# Moving a module into an existing Pyro file
# ----------------------------------------------------------------------------------------


def bound_names(node: ast.stmt) -> set:
    """Names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    names = set()
    for target in getattr(node, "targets", []) + [getattr(node, "target", None)]:
        if target is not None:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def statement_span(node: ast.stmt) -> Tuple[int, int]:
    """First line (with decorators) and last line of a top-level statement, 1-based."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno or node.lineno


def imported_names(tree: ast.Module) -> Dict[str, Tuple[str, str]]:
    """Names bound by a module's top-level imports -> (module, name)."""
    result = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                result[a.asname or a.name] = ("." * node.level + (node.module or ""), a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                result[(a.asname or a.name).split(".")[0]] = (a.name, "")
    return result


def move_into(target: str, module: str, target_module: str, comment: str, what: str) -> str:
    """
    ``target`` (an existing Pyro module) with ``module`` (converted) appended, before a
    final ``__all__``: the module's imports join the target's (ruff sorts and merges them
    later; an imported name that the target imports from elsewhere gets an alias, e.g.
    ``Distribution as TorchDistribution``, and the moved code uses it), imports from the
    target itself and the module's docstring and ``__all__`` are dropped, ``comment``
    heads the moved code, and a function of the target with the name of one of the
    module's is removed (the module's replaces it).
    """
    tree = ast.parse(module)
    target_tree = ast.parse(target)
    theirs = imported_names(target_tree)
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the module docstring
    future = False
    imports: List[str] = []
    renames: Dict[str, str] = {}
    while body and isinstance(body[0], (ast.Import, ast.ImportFrom)):
        node = body.pop(0)
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            future = True
            continue
        if isinstance(node, ast.ImportFrom) and node.module == target_module:
            continue
        names = []
        for bound, source in imported_names(ast.Module(body=[node], type_ignores=[])).items():
            if bound in theirs and theirs[bound] != source:
                if isinstance(node, ast.Import):
                    raise UpstreamError(f"{what}: 'import {source[0]}' clashes with the target's")
                renames[bound] = source[0].split(".")[0].capitalize() + source[1]
                names.append(f"{source[1]} as {renames[bound]}")
            else:
                names.append(bound if source[1] == bound else f"{source[1]} as {bound}")
        if isinstance(node, ast.ImportFrom):
            imports.append(f"from {theirs_module(node)} import {', '.join(names)}\n")
        else:
            imports.append(ast.get_source_segment(module, node) + "\n")
    if not body:
        raise UpstreamError(f"{what}: nothing to move")
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            raise UpstreamError(f"{what}:{node.lineno}: imports after the first definition")
    lines = module.splitlines(keepends=True)
    # the moved code uses the aliases
    names = [
        n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Name) and n.id in renames
    ]
    for n in sorted(names, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        line = lines[n.lineno - 1]
        lines[n.lineno - 1] = line[: n.col_offset] + renames[n.id] + line[n.end_col_offset :]
    # the moved module's __all__ does not restrict the target's names
    drop = [statement_span(n) for n in body if bound_names(n) == {"__all__"}]
    body = [n for n in body if bound_names(n) != {"__all__"}]
    start = statement_span(body[0])[0] if not drop else min(statement_span(body[0])[0], drop[0][0])
    moved_text = "".join(
        line
        for i, line in enumerate(lines[start - 1 :], start)
        if not any(a <= i <= b for a, b in drop)
    )
    moved_text = re.sub(r"\n{4,}", "\n\n\n", moved_text).strip("\n") + "\n"

    ours = set().union(set(), *(bound_names(n) for n in body))
    if ours & set(theirs):
        raise UpstreamError(f"{what} defines names {target_module} imports: {ours & set(theirs)}")
    target_lines = target.splitlines(keepends=True)
    for node in reversed(target_tree.body):
        clash = bound_names(node) & ours
        if not clash:
            continue
        if not isinstance(node, ast.FunctionDef):
            raise UpstreamError(f"{what} and {target_module} both define {sorted(clash)}")
        first, last = statement_span(node)
        del target_lines[first - 1 : last]
    target_tree = ast.parse("".join(target_lines))
    last_import = max(
        (n.end_lineno for n in target_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))),
        default=0,
    )
    final = target_tree.body[-1]
    tail_at = statement_span(final)[0] - 1 if bound_names(final) == {"__all__"} else None
    section = "".join(f"# {s}".rstrip() + "\n" for s in comment.splitlines()) if comment else ""
    moved = "\n\n" + section + moved_text + "\n\n"
    if tail_at is None:
        target_lines.append(moved)
    else:
        target_lines.insert(tail_at, moved)
    target_lines.insert(last_import, "".join(imports))
    if future and not any(
        isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in target_tree.body
    ):
        first = target_tree.body[0]
        at = first.end_lineno if isinstance(first, ast.Expr) else first.lineno - 1
        target_lines.insert(at, "from __future__ import annotations\n\n")
    return re.sub(r"\n{4,}", "\n\n\n", "".join(target_lines)).rstrip("\n") + "\n"


def theirs_module(node: ast.ImportFrom) -> str:
    """The module of a ``from`` import, as written."""
    return "." * node.level + (node.module or "")


# ----------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------


@dataclass
class TestModule:
    """A test-side module (test or helper) at one state."""

    text: str  # rewritten for Pyro, not yet formatted
    names: set  # top-level names it binds
    tests: List[str]  # top-level test functions and classes
    imports: set  # test-side modules it imports
    slow: List[str]  # tests marked slow here (the marks are removed)
    waiting: Dict[str, str]  # test or helper left out at this state -> what it needs


def referenced_names(node: ast.AST) -> set:
    """Names a statement reads."""
    return {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}


def inner_imports(node: ast.AST) -> List[Tuple[str, str]]:
    """``(module, name)`` of the ``from`` imports inside a statement (lazy imports)."""
    return [
        (sub.module or "", a.name)
        for sub in ast.walk(node)
        if isinstance(sub, ast.ImportFrom) and sub.level == 0
        for a in sub.names
    ] + [(a.name, "") for sub in ast.walk(node) if isinstance(sub, ast.Import) for a in sub.names]


_USES: Dict[int, Tuple[set, List[Tuple[str, str]]]] = {}


def node_uses(node: ast.stmt) -> Tuple[set, List[Tuple[str, str]]]:
    """:func:`referenced_names` and :func:`inner_imports` of a statement, computed once."""
    if id(node) not in _USES:
        _USES[id(node)] = (referenced_names(node), inner_imports(node))
    return _USES[id(node)]


_PARSED: Dict[str, ast.Module] = {}


def parse(source: str) -> ast.Module:
    """``ast.parse``, once per source text (the trees are never modified)."""
    if source not in _PARSED:
        _PARSED[source] = ast.parse(source)
    return _PARSED[source]


def filter_test_source(source: str, state: TreeState, what: str) -> Tuple[str, Dict[str, str]]:
    """
    ``source`` without what needs something the tree does not hold at this state: such
    imported names are removed from their import statements, and the top-level
    definitions that use them (transitively) are removed.

    :returns: the text, and removed definition -> what it needs
    """
    tree = parse(source)
    lines = source.splitlines(keepends=True)
    missing: Dict[str, str] = {}  # unavailable name -> why
    replace: Dict[Tuple[int, int], str] = {}
    removed: Dict[str, str] = {}
    handled = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            keep = []
            for alias in node.names:
                target, why = state.locate(node.module, alias.name)
                if target is None:
                    missing[alias.asname or alias.name] = why
                else:
                    keep.append(alias)
            if len(keep) < len(node.names):
                text = f"from {node.module} import {', '.join(map(alias_text, keep))}\n"
                replace[statement_span(node)] = text if keep else ""
            handled.add(id(node))
        elif isinstance(node, ast.Import):
            if any(never_available(a.name) for a in node.names):
                for alias in node.names:
                    missing[alias.asname or alias.name.split(".")[0]] = f"needs {alias.name}"
                replace[statement_span(node)] = ""
            handled.add(id(node))

    def needs(node: ast.stmt) -> Optional[str]:
        refs, inner = node_uses(node)
        for name in sorted(refs):
            if name in missing:
                return missing[name]
        for module, name in inner:
            if never_available(module):
                return f"needs {module}, which stays in pyro-markov-kl"
            if name and state.locate(module, name)[0] is None:
                return state.locate(module, name)[1]
        return None

    stem = Path(what).stem
    changed = True
    while changed:
        changed = False
        for node in tree.body:
            if id(node) in handled:
                continue
            name = getattr(node, "name", "")
            why = LEFT_OUT_TEST_FUNCTIONS.get(f"{stem}::{name}") or needs(node)
            if why is None:
                continue
            if not isinstance(
                node,
                (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign),
            ):
                raise UpstreamError(
                    f"{what}:{node.lineno}: a top-level statement {why}, which the tree "
                    f"after patch {state.k} does not hold"
                )
            handled.add(id(node))
            replace[statement_span(node)] = ""
            for name in bound_names(node):
                missing[name] = why
                removed[name] = why
            changed = True
    out: List[str] = []
    skip_until = 0
    spans = sorted(replace.items())
    for i, line in enumerate(lines, 1):
        if i <= skip_until:
            continue
        span = next((s for s in spans if s[0][0] == i), None)
        if span is not None:
            out.append(span[1])
            skip_until = span[0][1]
            continue
        out.append(line)
    text = re.sub(r"\n{4,}", "\n\n\n", "".join(out))  # no gaps wider than PEP 8's
    return text, removed


REQUIRES_FUNSOR = """
requires_funsor = pytest.mark.skipif(
    importlib.util.find_spec("funsor") is None, reason="requires funsor"
)
"""


def mark_funsor_tests(text: str) -> str:
    """Add ``@requires_funsor`` to the top-level tests that mention funsor; define it."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    marked = False
    last_import = max(
        (n.end_lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))), default=0
    )
    for node in reversed(tree.body):
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
            continue
        first, last = statement_span(node)
        if any(word in "".join(lines[first - 1 : last]) for word in FUNSOR_WORDS):
            lines.insert(first - 1, "@requires_funsor\n")
            marked = True
    if marked:
        lines.insert(last_import, "import importlib.util\n\nimport pytest\n" + REQUIRES_FUNSOR)
    return "".join(lines)


def drop_slow_marks(text: str) -> str:
    """
    Remove ``@pytest.mark.slow``: Pyro registers no ``slow`` marker (its pytest
    configuration turns warnings into errors) and runs every test; ``--check`` has its
    own quick selection (:data:`QUICK_SKIP_TESTS` and the tests marked slow here).
    """
    return re.sub(r"(?m)^[ \t]*@pytest\.mark\.slow[ \t]*\n", "", text)


def test_module(stem: str, state: TreeState) -> TestModule:
    """One of our test-side modules at this state."""
    path = TESTS_DIR / f"{stem}.py"
    source = pyro_header(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    source, removed = filter_test_source(source, state, path.name)
    tree = ast.parse(source)
    names = set().union(set(), *(bound_names(n) for n in tree.body))
    tests = [
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name.lower().startswith("test")
    ]
    imports = {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        and n.level == 0
        and (n.module in TEST_HELPERS or n.module in TEST_FILES)
    } | {
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for a in n.names
        if a.name in TEST_HELPERS
    }
    text = rewrite_imports(source, None, state, path.name)
    slow = [
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef)
        and any(ast.unparse(d) == "pytest.mark.slow" for d in n.decorator_list)
    ]
    text = mark_funsor_tests(drop_slow_marks(rewrite_text(text)))
    return TestModule(text, names, tests, imports, slow=slow, waiting=removed)


def test_modules(state: TreeState) -> Dict[str, TestModule]:
    """Every test-side module at this state, helpers first (they are imported by tests)."""
    result: Dict[str, TestModule] = {}
    busy: set = set()

    def visit(stem: str) -> None:
        if stem in result:
            return
        if stem in busy:
            raise UpstreamError(f"test modules import each other in a cycle: {stem}")
        busy.add(stem)
        tree = ast.parse((TESTS_DIR / f"{stem}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                if node.module in TEST_HELPERS or node.module in TEST_FILES:
                    visit(node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in TEST_HELPERS:
                        visit(alias.name)
        result[stem] = test_module(stem, state)
        state.test_names[stem] = result[stem].names
        busy.discard(stem)

    for stem in [*TEST_HELPERS, *TEST_FILES]:
        visit(stem)
    return result


def unlisted_modules() -> List[str]:
    """Our package modules and test modules that the series neither adds nor leaves out."""
    known = set(PLACEMENTS) | {"__init__", "__main__"} | set(LEFT_OUT_MODULES)
    found = [p.stem for p in PACKAGE_DIR.glob("*.py")]
    found += [p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").exists()]
    notes = [f"pyro_markov_kl/{n}" for n in sorted(set(found) - known)]
    known_tests = set(TEST_FILES) | set(LEFT_OUT_TESTS)
    notes += [
        f"tests/{p.name}" for p in sorted(TESTS_DIR.glob("test_*.py")) if p.stem not in known_tests
    ]
    return notes


# ----------------------------------------------------------------------------------------
# Changes to existing Pyro files
# ----------------------------------------------------------------------------------------


def add_infer_exports(text: str, exports: Mapping[str, str], modules: Mapping[str, str]) -> str:
    """
    ``pyro/infer/__init__.py`` with the import of each exported name (ruff sorts them)
    and the name in ``__all__`` before the given entry.

    :param modules: exported name -> the Pyro module defining it
    """
    lines = text.splitlines(keepends=True)
    by_module: Dict[str, List[str]] = {}
    for name in exports:
        by_module.setdefault(modules[name], []).append(name)
    last = max(i for i, s in enumerate(lines) if s.startswith("from pyro.infer."))
    for module, names in by_module.items():
        lines.insert(last + 1, f"from {module} import {', '.join(sorted(names))}\n")
    for name, successor in exports.items():
        entry = f'    "{name}",\n'
        at = next((i for i, s in enumerate(lines) if s.strip() == f'"{successor}",'), None)
        if at is None:
            raise UpstreamError(f'pyro/infer/__init__.py: no "{successor}" in __all__')
        lines.insert(at, entry)
    return "".join(lines)


def add_beside(text: str, beside: Mapping[str, str], what: str) -> str:
    """
    A Pyro test module with our classes added to its ELBO parametrizations: after every
    element of a ``pytest.mark.parametrize`` value list that is (or starts with, or wraps
    in ``xfail_param``/``pytest.param``) one of the keys of ``beside``, a copy of the
    element naming the value instead; and the import of our classes.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    inserts: List[Tuple[int, str]] = []

    def key(elt: ast.expr) -> Optional[str]:
        if isinstance(elt, ast.Tuple) and elt.elts:
            elt = elt.elts[0]
        if isinstance(elt, ast.Call) and elt.args:
            elt = elt.args[0]
        return elt.id if isinstance(elt, ast.Name) and elt.id in beside else None

    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "parametrize"
            and len(node.args) >= 2
            and isinstance(node.args[1], (ast.List, ast.Tuple))
        ):
            continue
        for elt in node.args[1].elts:
            name = key(elt)
            if name is None:
                continue
            first, last = elt.lineno, elt.end_lineno
            segment = "".join(lines[first - 1 : last])
            before, after = (
                lines[first - 1][: elt.col_offset],
                lines[last - 1][elt.end_col_offset :],
            )
            if before.strip() or after.strip() not in (",", ""):
                raise UpstreamError(f"{what}:{first}: {name} is not alone on its lines")
            inserts.append((last, re.sub(rf"\b{name}\b", beside[name], segment)))
    if not inserts:
        raise UpstreamError(f"{what}: no parametrize list names {', '.join(beside)}")
    for at, new in sorted(inserts, reverse=True):
        lines.insert(at, new)
    imports = [
        n
        for n in tree.body
        if isinstance(n, ast.ImportFrom)
        and n.module == "pyro.infer"
        and any(a.name in beside for a in n.names)
    ]
    if not imports:
        raise UpstreamError(f"{what}: no 'from pyro.infer import' of {', '.join(beside)}")
    used = sorted({v for k, v in beside.items() if any(a.name == k for a in imports[0].names)})
    # our inserts are all below the import: its line number still holds
    lines.insert(imports[0].end_lineno, f"from pyro.infer import {', '.join(used)}\n")
    return "".join(lines)


def docs_entries(k: int) -> str:
    """The ``automodule`` entries of the first ``k`` patches."""
    return "".join(
        f".. automodule:: {module}\n{DOCS_OPTIONS}\n" for spec in SERIES[:k] for module in spec.docs
    )


def add_docs(text: str, k: int) -> str:
    """``docs/source/inference_algos.rst`` (or its known lines) with the entries."""
    if not docs_entries(k):
        return text
    if DOCS_ANCHOR not in text.splitlines(keepends=True):
        raise UpstreamError(f"{DOCS_PATH}: no line {DOCS_ANCHOR.strip()}")
    return text.replace(DOCS_ANCHOR, docs_entries(k) + DOCS_ANCHOR, 1)


# ----------------------------------------------------------------------------------------
# Pyro source tree, ruff, diff
# ----------------------------------------------------------------------------------------


def pyro_version() -> str:
    """The installed pyro-ppl version."""
    try:
        return importlib.metadata.version("pyro-ppl")
    except importlib.metadata.PackageNotFoundError:
        raise UpstreamError(f"pyro-ppl is not installed for {sys.executable}") from None


def download_sdist(version: str, dest: Path) -> Path:
    """Fetch the pyro-ppl sdist from PyPI with pip; a clear error if that fails."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--progress-bar", "off", "--timeout", "30",
        "--retries", "2", "-d", str(dest), f"pyro-ppl=={version}",
    ]  # fmt: skip
    log(f"downloading the pyro-ppl {version} sdist: {' '.join(cmd[2:])}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        failed = proc.returncode != 0
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        failed, output = True, f"timed out after {e.timeout:.0f} s"
    found = sorted(dest.glob("pyro_ppl-*.tar.gz")) + sorted(dest.glob("pyro-ppl-*.tar.gz"))
    if failed or not found:
        tail = [s for s in output.splitlines() if "WARNING: Location 'file:" not in s][-15:]
        raise UpstreamError(
            f"could not download the pyro-ppl=={version} sdist from PyPI:\n    "
            + "\n    ".join(tail)
            + "\nCheck network access to PyPI, or pass --sdist FILE (a downloaded "
            f"pyro_ppl-{version}.tar.gz) or --pyro-source DIR (a Pyro source checkout)."
        )
    return found[0]


def extract(archive: Path, dest: Path) -> List[str]:
    """Unpack a tar archive into ``dest``; returns its top-level names."""
    with tarfile.open(archive) as tar:
        roots = sorted({Path(m.name).parts[0] for m in tar.getmembers() if m.name})
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(dest)  # noqa: S202 -- PyPI's pyro-ppl sdist, the pyro-tests kit
    return roots


def unpack_sdist(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist into ``dest``; returns the source tree."""
    roots = extract(sdist, dest)
    if len(roots) != 1:
        raise UpstreamError(f"{sdist}: expected one top-level directory, got {roots}")
    tree = dest / roots[0]
    if not (tree / "pyro" / "infer" / "__init__.py").exists():
        raise UpstreamError(f"{sdist} does not contain pyro/infer/__init__.py")
    return tree


def pyro_tests_archive(kit: Path) -> Path:
    """The archive of Pyro's tests in the pyro-tests kit."""
    found = sorted(kit.glob("pyro-tests-*.tar.gz"))
    if not found:
        raise UpstreamError(
            f"no pyro-tests-*.tar.gz in {kit}: the series edits Pyro's tests, which the "
            "sdist does not ship; pass --pyro-tests DIR (the pyro-tests kit) or --pyro-source"
        )
    return found[-1]


def add_pyro_tests(tree: Path, archive: Path) -> str:
    """Unpack Pyro's ``tests/`` from the kit's archive over the tree; returns its commit."""
    with tempfile.TemporaryDirectory(prefix="pyro-tests-") as tmp:
        extract(archive, Path(tmp))
        if not (Path(tmp) / "tests" / "infer").is_dir():
            raise UpstreamError(f"{archive} holds no tests/infer/")
        shutil.rmtree(tree / "tests", ignore_errors=True)
        shutil.copytree(Path(tmp) / "tests", tree / "tests")
    match = re.search(r"pyro-tests-([0-9a-f]+)", archive.name)
    return match.group(1) if match else archive.name


def find_ruff() -> List[str]:
    """The ruff command: next to the Python executable, on PATH, or ``python -m ruff``."""
    local = Path(sys.executable).parent / "ruff"
    if local.exists():
        return [str(local)]
    found = shutil.which("ruff")
    if found:
        return [found]
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "ruff"]
    raise UpstreamError("ruff not found (install the dev extra)")


def run(cmd: Sequence[str], cwd: Path, env: Optional[dict] = None, what: str = "") -> str:
    """Run a command; raise :class:`UpstreamError` with its output if it fails."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UpstreamError(
            f"{what or cmd[0]} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            + (proc.stdout + proc.stderr).strip()
        )
    return proc.stdout


def ruff_config_files(tree: Path) -> List[str]:
    """The files holding the Pyro tree's ruff configuration."""
    return [
        n for n in ("pyproject.toml", "ruff.toml", ".ruff.toml", "setup.cfg") if (tree / n).exists()
    ]


def format_files(staging: Path, paths: Sequence[str], ruff: List[str]) -> None:
    """Sort imports, drop unused ones and format, with the Pyro tree's ruff config."""
    py = [p for p in paths if p.endswith(".py")]
    run([*ruff, "check", "--quiet", "--fix", "--select", "I,F401", *py], staging, what="ruff --fix")
    run([*ruff, "format", "--quiet", *py], staging, what="ruff format")


def unified_diff(path: str, old: Optional[str], new: str) -> str:
    """A git-style unified diff of one file (``old`` is ``None`` for a new file)."""
    for text in (old, new):
        if text and not text.endswith("\n"):
            raise UpstreamError(f"{path}: no newline at end of file")
    head = f"diff --git a/{path} b/{path}\n"
    if old is None:
        head += "new file mode 100644\n"
    diff = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile="/dev/null" if old is None else f"a/{path}",
        tofile=f"b/{path}",
        n=3,
    )
    return head + "".join(diff)


def docs_fragment_diff(old: str, new: str) -> str:
    """
    The diff of the docs file known only by its lines around :data:`DOCS_ANCHOR`
    (:data:`DOCS_CONTEXT`): one hunk inserting before the anchor, with three lines of
    context on each side, at the anchor's line in Pyro's file.
    """
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    at = old_lines.index(DOCS_ANCHOR)
    inserted = new_lines[at : len(new_lines) - (len(old_lines) - at)]
    if old_lines[:at] + inserted + old_lines[at:] != new_lines or at < 3:
        raise UpstreamError(f"{DOCS_PATH}: not an insertion before the anchor")
    before, after = old_lines[at - 3 : at], old_lines[at : at + 3]
    start = DOCS_ANCHOR_LINE + (at - DOCS_CONTEXT.index(DOCS_ANCHOR)) - 3
    body = [" " + s for s in before] + ["+" + s for s in inserted] + [" " + s for s in after]
    return (
        f"diff --git a/{DOCS_PATH} b/{DOCS_PATH}\n--- a/{DOCS_PATH}\n+++ b/{DOCS_PATH}\n"
        f"@@ -{start},6 +{start},{6 + len(inserted)} @@\n" + "".join(body)
    )


def diff_counts(diff: str) -> Tuple[int, int]:
    """Lines added and removed by a diff."""
    added = sum(1 for s in diff.splitlines() if s.startswith("+") and not s.startswith("+++"))
    removed = sum(1 for s in diff.splitlines() if s.startswith("-") and not s.startswith("---"))
    return added, removed


# ----------------------------------------------------------------------------------------
# Building the series
# ----------------------------------------------------------------------------------------


@dataclass
class Patch:
    """One generated patch."""

    number: int
    spec: PatchSpec
    diffs: Dict[str, str]  # path -> diff (in order)
    files: Dict[str, str]  # path -> content after the patch, for every file it touches
    tests_added: Dict[str, List[str]]  # Pyro test file of ours -> tests the patch adds
    slow_tests: List[str]  # tests it adds that our repository marks slow
    text: str = ""

    @property
    def name(self) -> str:
        return f"{self.number:04d}-{self.spec.slug}.patch"

    @property
    def counts(self) -> Tuple[int, int]:
        added = removed = 0
        for diff in self.diffs.values():
            a, r = diff_counts(diff)
            added, removed = added + a, removed + r
        return added, removed


@dataclass
class Series:
    """The generated series and what it is made of."""

    patches: List[Patch]
    base: Dict[str, Optional[str]]  # path -> content in the Pyro tree (None: absent)
    final: Dict[str, str]  # path -> content after the whole series
    docs_synthetic: bool
    left_out: Dict[str, str]  # test left out -> what it needs
    source_note: str


def tree_state(k: int, base: Path, docs_base: str) -> Tuple[Dict[str, str], Dict[str, TestModule]]:
    """
    The tree after the first ``k`` patches: every file they add or change, unformatted
    (path -> content), and our test modules present in it (stem -> module).
    """
    state = TreeState(k)
    files: Dict[str, str] = {}
    for ours, place in PLACEMENTS.items():
        if place.patch > k or place.moved:
            continue
        files[place.path] = convert_module(ours, state)
    init = subpackage_init(state)
    if init is not None:
        files[f"{SUBPACKAGE_DIR}/__init__.py"] = init
    moved_targets: Dict[str, str] = {}
    for spec in SERIES[:k]:
        for ours, path in spec.moves.items():
            text = moved_targets.get(path) or (base / path).read_text(encoding="utf-8")
            moved_targets[path] = move_into(
                text, convert_module(ours, state), module_name(path), spec.move_comment, ours
            )
    files.update(moved_targets)
    exports = {n: s for spec in SERIES[:k] for n, s in spec.exports.items()}
    if exports:
        modules = {n: PLACEMENTS[ROOT_EXPORTS[n]].module for n in exports}
        infer_init = (base / "pyro/infer/__init__.py").read_text(encoding="utf-8")
        files["pyro/infer/__init__.py"] = add_infer_exports(infer_init, exports, modules)
    if docs_entries(k):
        files[DOCS_PATH] = add_docs(docs_base, k)
    for spec in SERIES[:k]:
        for path, beside in spec.pyro_test_edits.items():
            text = files.get(path) or (base / path).read_text(encoding="utf-8")
            files[path] = add_beside(text, beside, path)
    modules = test_modules(state)
    present = {stem for stem, (j, _) in TEST_FILES.items() if j <= k and modules[stem].tests}
    for stem, (j, _) in TEST_FILES.items():
        if j == k and stem not in present:
            raise UpstreamError(
                f"tests/{stem}.py: patch {k} adds it, but none of its tests can run after "
                f"patch {k}; add it with a later patch"
            )
    needed = set(present)
    todo = list(present)
    while todo:
        for imported in modules[todo.pop()].imports:
            if imported not in needed:
                needed.add(imported)
                todo.append(imported)
    for stem in needed:
        path = TEST_HELPERS.get(stem) or TEST_FILES[stem][1]
        files[path] = modules[stem].text
    if any(p.startswith(TESTS_SUBDIR + "/") for p in files):
        files[f"{TESTS_SUBDIR}/__init__.py"] = PYRO_HEADER
    return files, {s: m for s, m in modules.items() if s in present}


def build_series(base: Path, source_note: str, ruff: List[str]) -> Series:
    """Generate every tree state, format it, diff consecutive states."""
    docs_file = base / DOCS_PATH
    docs_synthetic = not docs_file.exists()
    docs_base = "".join(DOCS_CONTEXT) if docs_synthetic else docs_file.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="markov-kl-ruff-") as tmp:
        staging = Path(tmp)
        # ruff tells first-party modules (pyro, tests) by the files present
        for name in ruff_config_files(base):
            shutil.copy(base / name, staging / name)
        for name in ("pyro", "tests"):
            if (base / name).is_dir():
                shutil.copytree(
                    base / name, staging / name, ignore=shutil.ignore_patterns("__pycache__")
                )
        states: List[Dict[str, str]] = [{}]
        tests_at: List[Dict[str, TestModule]] = [{}]
        for k in range(1, len(SERIES) + 1):
            files, tests = tree_state(k, base, docs_base)
            for path, text in files.items():
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                (staging / path).write_text(text, encoding="utf-8")
            format_files(staging, sorted(files), ruff)
            states.append({p: (staging / p).read_text(encoding="utf-8") for p in files})
            tests_at.append(tests)

    base_files: Dict[str, Optional[str]] = {}
    for path in states[-1]:
        if path == DOCS_PATH and docs_synthetic:
            base_files[path] = docs_base
        else:
            base_files[path] = (
                (base / path).read_text(encoding="utf-8") if (base / path).exists() else None
            )
    for path, text in states[-1].items():
        if OUR_PACKAGE in text:
            raise UpstreamError(f"{path} still mentions {OUR_PACKAGE}")
        if base_files[path] is None and path.endswith(".py") and not text.startswith(PYRO_HEADERS):
            raise UpstreamError(f"{path} does not start with Pyro's license header")

    patches = []
    for k, spec in enumerate(SERIES, 1):
        before, after = states[k - 1], states[k]
        diffs: Dict[str, str] = {}
        for path in sorted(after):
            old = before.get(path, base_files[path])
            if old == after[path]:
                continue
            if path == DOCS_PATH and docs_synthetic:
                diffs[path] = docs_fragment_diff(old, after[path])
            else:
                diffs[path] = unified_diff(path, old, after[path])
        added: Dict[str, List[str]] = {}
        for stem, module in tests_at[k].items():
            old_tests = set(tests_at[k - 1][stem].tests) if stem in tests_at[k - 1] else set()
            new = [t for t in module.tests if t not in old_tests]
            if new:
                added[TEST_FILES[stem][1]] = new
        slow = sorted({t for stem, m in tests_at[k].items() for t in m.slow})
        patches.append(Patch(k, spec, diffs, {p: after[p] for p in diffs}, added, slow))
    final_tests = tests_at[-1]
    left_out = {
        f"tests/{stem}.py::{name}": why
        for stem, module in final_tests.items()
        for name, why in module.waiting.items()
        if name.startswith("test")
    }
    series = Series(patches, base_files, states[-1], docs_synthetic, left_out, source_note)
    for patch in patches:
        patch.text = patch_text(patch, series, tests_at)
    return series


# ----------------------------------------------------------------------------------------
# Patch text
# ----------------------------------------------------------------------------------------


def our_revision() -> str:
    """``git describe`` of this repository, or the package version without git."""
    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        proc = None
    if proc is not None and proc.returncode == 0:
        return proc.stdout.strip()
    match = re.search(r'^__version__ = "([^"]+)"', (PACKAGE_DIR / "__init__.py").read_text(), re.M)
    return match.group(1) if match else "unknown"


def our_author_and_date() -> Tuple[str, str]:
    """The author line and date of the patches: this repository's last commit."""
    try:
        proc = subprocess.run(
            ["git", "log", "-1", "--format=%an <%ae>%n%aD"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        author, date = proc.stdout.strip().splitlines()
        return author, date
    except (OSError, ValueError):
        return "pyro-markov-kl developers <noreply@example.invalid>", email.utils.formatdate()


def wrap(text: str) -> str:
    """Paragraphs of the description, wrapped at 72 columns (lists and code kept)."""
    out = []
    for para in text.strip().split("\n\n"):
        if para.startswith(("  ", "* ", "- ", "1.")) or "\n  " in para or "\n* " in para:
            out.append(para)
        else:
            out.append(textwrap.fill(" ".join(para.split()), 72))
    return "\n\n".join(out)


def listing(text: str) -> str:
    """One entry of a list in the patch text, wrapped at 72 columns."""
    return textwrap.fill(
        text,
        72,
        initial_indent="    ",
        subsequent_indent="        ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def generated_notes(patch: Patch, series: Series, tests_at: List[Dict[str, TestModule]]) -> str:
    """The part of the description that the script writes: files and tests."""
    lines = ["Files:"]
    earlier = set().union(set(), *(p.diffs for p in series.patches[: patch.number - 1]))
    for path, diff in patch.diffs.items():
        added, removed = diff_counts(diff)
        kind = "new" if series.base[path] is None and path not in earlier else "changed"
        lines.append(f"    {path} ({kind}, +{added} -{removed})")
    if series.docs_synthetic and DOCS_PATH in patch.diffs:
        lines += [
            "",
            f"The {DOCS_PATH} hunk was made without that file (the sdist has no docs/):",
            f"its context is the lines around '{DOCS_ANCHOR.strip()}'.",
        ]
    if patch.tests_added:
        lines += ["", "Tests added (pytest):"]
        for path, tests in patch.tests_added.items():
            lines.append(listing(f"{path}: {', '.join(tests)}"))
    k = patch.number
    later: Dict[str, List[str]] = {}
    for stem, module in tests_at[k].items():
        if TEST_FILES[stem][0] != k:
            continue
        for name, why in module.waiting.items():
            if name.startswith("test") and f"tests/{stem}.py::{name}" not in series.left_out:
                later.setdefault(TEST_FILES[stem][1], []).append(f"{name} ({why})")
    if later:
        lines += ["", "Tests of these files that follow in later patches:"]
        for path, tests in later.items():
            lines += [listing(f"{path}: {t}") for t in tests]
    if k == len(series.patches) and series.left_out:
        lines += [
            "",
            "Tests of pyro-markov-kl left out of the series (they need what stays there):",
        ]
        lines += [listing(f"{t}: {why}") for t, why in series.left_out.items()]
        lines += [listing(f"tests/{stem}.py: {why}") for stem, why in LEFT_OUT_TESTS.items()]
    return "\n".join(lines)


def diffstat(patch: Patch) -> str:
    """``git format-patch``'s summary of the files a patch touches."""
    rows = []
    width = max(len(p) for p in patch.diffs)
    for path, diff in patch.diffs.items():
        added, removed = diff_counts(diff)
        total = added + removed
        bar = "+" * min(added, 40) + "-" * min(removed, 40 - min(added, 40))
        rows.append(f" {path.ljust(width)} | {total:4d} {bar}")
    added, removed = patch.counts
    rows.append(f" {len(patch.diffs)} files changed, {added} insertions(+), {removed} deletions(-)")
    return "\n".join(rows)


def patch_text(patch: Patch, series: Series, tests_at: List[Dict[str, TestModule]]) -> str:
    """The patch file: mail headers, description, diffstat, then the diffs."""
    author, date = our_author_and_date()
    n = len(series.patches)
    head = [
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001",
        f"From: {author}",
        f"Date: {date}",
        f"Subject: [PATCH {patch.number}/{n}] {patch.spec.title}",
        "",
        wrap(patch.spec.description),
        "",
        generated_notes(patch, series, tests_at),
        "",
        f"Generated by scripts/make_upstream_series.py from pyro-markov-kl {our_revision()}",
        f"against {series.source_note}.",
        "---",
        diffstat(patch),
        "",
    ]
    return "\n".join(head) + "\n" + "".join(patch.diffs.values())


def write_series(series: Series, output: Path) -> None:
    """Write the patches and the ``series`` file into ``output`` (old patches removed)."""
    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("*.patch"):
        old.unlink()
    for patch in series.patches:
        (output / patch.name).write_text(patch.text, encoding="utf-8")
    (output / "series").write_text("".join(p.name + "\n" for p in series.patches), encoding="utf-8")


def single_patch(series: Series) -> str:
    """The whole series as one patch against the Pyro tree."""
    diffs = []
    for path, text in sorted(series.final.items()):
        if path == DOCS_PATH and series.docs_synthetic:
            diffs.append(docs_fragment_diff(series.base[path] or "", text))
        else:
            diffs.append(unified_diff(path, series.base[path], text))
    titles = "".join(f"    {p.number}. {p.spec.title}\n" for p in series.patches)
    return (
        "The upstream series in one patch: its patches are\n"
        + titles
        + f"\nGenerated by scripts/make_upstream_series.py from pyro-markov-kl {our_revision()}\n"
        + f"against {series.source_note}.\n\n"
        + "".join(diffs)
    )


# ----------------------------------------------------------------------------------------
# Applying and checking
# ----------------------------------------------------------------------------------------


def git_env(tree: Path) -> dict:
    """Environment for ``git apply`` in ``tree`` as a plain directory (not a repository)."""
    env = dict(os.environ)
    if not (tree / ".git").exists():
        # do not discover a repository above the tree (e.g. --workdir inside this one)
        env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    return env


def without_file(patch_text: str, path: str) -> str:
    """The patch without the diff of one file."""
    parts = re.split(r"(?m)^(?=diff --git )", patch_text)
    return "".join(p for p in parts if not p.startswith(f"diff --git a/{path} "))


def apply_patch(tree: Path, patch_file: Path, patch: Patch, docs_synthetic: bool) -> None:
    """
    ``git apply --check``, then ``git apply`` (``patch -p1`` without git), and check that
    the result is what was generated.
    """
    text = patch_file.read_text(encoding="utf-8")
    if docs_synthetic and DOCS_PATH in patch.diffs:
        text = without_file(text, DOCS_PATH)
    with tempfile.NamedTemporaryFile("w", suffix=".patch", delete=False) as f:
        f.write(text)
    if shutil.which("git"):
        cmd, check = ["git", "apply", "--whitespace=nowarn", f.name], "--check"
    elif shutil.which("patch"):
        cmd, check = ["patch", "-p1", "--batch", "--forward", "--quiet", "-i", f.name], "--dry-run"
    else:
        raise UpstreamError("neither git nor patch is installed: cannot apply the patch")
    try:
        env = git_env(tree)
        run([*cmd, check], tree, env, f"{patch.name}: {cmd[0]} {check}")
        run(cmd, tree, env, f"{patch.name}: {cmd[0]}")
    finally:
        os.unlink(f.name)
    for path, content in patch.files.items():
        if docs_synthetic and path == DOCS_PATH:
            continue
        if (tree / path).read_text(encoding="utf-8") != content:
            raise UpstreamError(f"{patch.name}: applying it did not give the generated {path}")


def check_env(tree: Path) -> dict:
    """Environment for running the patched tree: its pyro first, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


IMPORT_CHECK = """
import importlib, sys
sys.modules["funsor"] = None  # the patched pyro must import without funsor
tree, modules = sys.argv[1], sys.argv[2:]
import pyro, pyro.infer
assert pyro.__file__.startswith(tree), f"imported {pyro.__file__}, not the patched tree"
for m in modules:
    importlib.import_module(m)
assert "pyro_markov_kl" not in sys.modules, "the patched pyro imports pyro_markov_kl"
print(f"{len(modules)} modules import without funsor")
"""

PYTEST_WITHOUT_FUNSOR = """
import sys
sys.modules["funsor"] = None
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def lint(tree: Path, paths: Sequence[str], ruff: List[str]) -> List[str]:
    """Pyro's lint on the given files: ruff check, ruff format --check, the license header."""
    problems = []
    py = [p for p in paths if p.endswith(".py")]
    if not py:
        return problems
    for cmd in (["check", "--quiet"], ["format", "--check", "--quiet"]):
        proc = subprocess.run([*ruff, *cmd, *py], cwd=tree, capture_output=True, text=True)
        if proc.returncode != 0:
            problems.append(f"ruff {cmd[0]}:\n" + (proc.stdout + proc.stderr).strip())
    for path in py:
        if not (tree / path).read_text(encoding="utf-8").startswith(PYRO_HEADERS):
            problems.append(f"{path}: no Pyro license header")
    return problems


def pytest_counts(output: str) -> Dict[str, int]:
    """The counts of pytest's summary line."""
    lines = [
        s
        for s in output.strip().splitlines()
        if re.search(r"\d+ (passed|failed|error|skipped|deselected|no tests)", s)
    ]
    counts: Dict[str, int] = {}
    if lines:
        for number, word in re.findall(
            r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", lines[-1]
        ):
            counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return counts


@dataclass
class CheckResult:
    """What ``--check`` found for one patch."""

    patch: Patch
    lint_ok: bool = False
    counts: Dict[str, int] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    failed_runs: int = 0
    seconds: float = 0.0


def test_runs(patch: Patch, quick: bool) -> List[Tuple[str, List[str]]]:
    """
    The pytest runs of one patch, as (label, arguments): one run of the tests it adds
    (files it adds whole, single tests it adds to a file of an earlier patch) and of our
    classes' cases in the Pyro test files it edits (``-k``); one run per entry of the
    table's ``pyro_tests``.
    """
    targets: List[str] = []
    collect: List[str] = []
    for path, tests in patch.tests_added.items():
        stem = next(s for s, (_, p) in TEST_FILES.items() if p == path)
        if quick and stem in QUICK_SKIP_FILES:
            collect.append(path)
            continue
        if TEST_FILES[stem][0] == patch.number:
            targets.append(path)
        else:
            targets += [f"{path}::{t}" for t in tests]
    # -k keywords that select our test files whole (a file's directory or name) and our
    # classes' cases in Pyro's test files
    ours = {
        "markov_kl" if t.startswith(TESTS_SUBDIR + "/") else Path(t.split("::")[0]).stem
        for t in targets
    }
    classes = sorted({c for beside in patch.spec.pyro_test_edits.values() for c in beside.values()})
    targets += list(patch.spec.pyro_test_edits)
    runs = []
    if targets:
        select = " or ".join([*sorted(ours), *classes])
        if quick:
            skip = [*QUICK_SKIP_TESTS, *patch.slow_tests]
            select = f"({select}) and " + " and ".join(f"not {t}" for t in skip)
        runs.append(("tests", [*targets, "-k", select]))
    if collect:  # the quick selection skips them: at least they import and collect
        runs.append(("collect", [*collect, "--collect-only"]))
    for target in patch.spec.pyro_tests:
        args = shlex.split(target)
        missing = [
            m
            for prefix, m in PYRO_TEST_REQUIRES.items()
            if args[0].startswith(prefix) and importlib.util.find_spec(m) is None
        ]
        if missing:
            log(f"{patch.name}: not running {target}: needs {', '.join(missing)}")
            continue
        runs.append((Path(args[0].split("::")[0]).name, args))
    deselect = [f"--deselect={test_id}" for test_id in KNOWN_FAILURES]
    return [(label, [*args, *deselect]) for label, args in runs]


def check_patch(
    tree: Path, patch: Patch, ruff: List[str], quick: bool, without_funsor: bool
) -> CheckResult:
    """Import, lint and test the tree after one patch."""
    result = CheckResult(patch)
    t0 = time.monotonic()
    env = check_env(tree)
    modules = sorted(
        {module_name(p) for p in patch.diffs if p.startswith("pyro/") and p.endswith(".py")}
    )
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, str(tree), *modules],
        cwd=tree, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        result.problems.append("import check failed:\n" + (proc.stdout + proc.stderr).strip())
    problems = lint(tree, list(patch.diffs), ruff)
    result.lint_ok = not problems
    result.problems += problems
    for label, args in test_runs(patch, quick):
        args = ["-q", "-p", "no:cacheprovider", *args]
        if without_funsor:
            cmd = [sys.executable, "-c", PYTEST_WITHOUT_FUNSOR, *args]
        else:
            cmd = [sys.executable, "-m", "pytest", *args]
        log(f"{patch.name}: pytest {' '.join(args)}")
        t1 = time.monotonic()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        counts = pytest_counts(output) if label != "collect" else {}
        for word, number in counts.items():
            result.counts[word] = result.counts.get(word, 0) + number
        log(
            f"{patch.name}: {label}: {(output.strip() or '?').splitlines()[-1]} "
            f"[{time.monotonic() - t1:.0f} s]"
        )
        result.failed_runs += proc.returncode != 0
        if proc.returncode == 5:
            result.problems.append(f"{label}: pytest collected no tests")
        elif proc.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-40:])
            result.problems.append(f"{label}: tests failed:\n{tail}")
    result.seconds = time.monotonic() - t0
    return result


def report_line(result: CheckResult) -> str:
    """One line of the per-patch summary."""
    added, removed = result.patch.counts
    c = result.counts
    tests = f"{c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed"
    if result.failed_runs and not (c.get("failed") or c.get("error")):
        tests += f" ({result.failed_runs} run(s) FAILED)"
    extra = ", ".join(f"{c[w]} {w}" for w in ("skipped", "xfailed", "xpassed") if c.get(w))
    return (
        f"{result.patch.name:<52} +{added:<5} -{removed:<4} {len(result.patch.diffs):>3} files  "
        f"lint {'ok' if result.lint_ok else 'FAILED'}  tests {tests}"
        + (f" ({extra})" if extra else "")
        + f"  [{result.seconds:.0f} s]"
    )


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Make the series of patches that adds pyro-markov-kl to Pyro "
        f"({DEFAULT_OUTPUT.relative_to(REPO)}/), optionally apply and test it patch by patch.",
        epilog="See docs/upstreaming.rst.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--pyro-source",
        type=Path,
        metavar="DIR",
        help="patch this Pyro source tree (a git checkout, with tests/ and docs/) instead of "
        "the sdist; --apply modifies it",
    )
    source.add_argument(
        "--sdist",
        type=Path,
        metavar="FILE",
        help="use this pyro-ppl sdist instead of downloading one",
    )
    parser.add_argument(
        "--pyro-version",
        default=None,
        help="pyro-ppl version of the sdist (default: the installed one)",
    )
    parser.add_argument(
        "--pyro-tests",
        type=Path,
        default=DEFAULT_PYRO_TESTS,
        metavar="DIR",
        help="the pyro-tests kit whose archive of Pyro's tests/ is unpacked over the sdist "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=DEFAULT_OUTPUT,
        help="directory for the patches and the series file (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--single",
        type=Path,
        metavar="FILE",
        help="also write the whole series as one patch to FILE",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="unpack the sdist here and keep it (default: a temporary directory, removed at exit)",
    )
    parser.add_argument("--apply", action="store_true", help="apply the series to the source tree")
    parser.add_argument(
        "--check",
        action="store_true",
        help="(implies --apply) after each patch: import the changed modules, lint the changed "
        "files with the tree's configuration, run the tests the patch adds and the Pyro tests "
        "it touches",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="with --check: run every test (default: skip the slowest)",
    )
    parser.add_argument(
        "--without-funsor",
        action="store_true",
        help="with --check: run the tests with funsor unimportable",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    args.apply = args.apply or args.check
    t_start = time.monotonic()
    for note in unlisted_modules():
        log(
            f"note: {note} is neither in the series nor left out "
            f"(see SERIES in {Path(__file__).name})"
        )
    ruff = find_ruff()

    with tempfile.TemporaryDirectory(prefix="pyro-markov-kl-upstream-") as tmp:
        if args.pyro_source is not None:
            tree = args.pyro_source.resolve()
            if not (tree / "pyro" / "infer" / "__init__.py").exists():
                raise UpstreamError(f"{tree} is not a Pyro source tree (no pyro/infer/__init__.py)")
            source_note = f"the Pyro source tree {tree}"
        else:
            version = args.pyro_version or pyro_version()
            work = args.workdir.resolve() if args.workdir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            stale = work / f"pyro_ppl-{version}"
            if stale.exists():
                shutil.rmtree(stale)
            if args.sdist is not None:
                sdist = args.sdist.resolve()
            else:
                download = work / "download"
                shutil.rmtree(download, ignore_errors=True)
                t0 = time.monotonic()
                sdist = download_sdist(version, download)
                log(f"downloaded {sdist.name} [{time.monotonic() - t0:.1f} s]")
            tree = unpack_sdist(sdist, work)
            commit = add_pyro_tests(tree, pyro_tests_archive(args.pyro_tests.resolve()))
            source_note = (
                f"the pyro-ppl {version} sdist ({sdist.name}) with tests/ of pyro-ppl/pyro "
                f"at {commit}"
            )

        t0 = time.monotonic()
        series = build_series(tree, source_note, ruff)
        output = args.output.resolve()
        write_series(series, output)
        log(f"wrote {len(series.patches)} patches to {output} [{time.monotonic() - t0:.1f} s]")
        for patch in series.patches:
            added, removed = patch.counts
            log(f"  {patch.name}: +{added} -{removed}, {len(patch.diffs)} files")
        for test, why in series.left_out.items():
            log(f"test left out: {test}: {why}")
        if args.single:
            args.single.parent.mkdir(parents=True, exist_ok=True)
            args.single.write_text(single_patch(series), encoding="utf-8")
            log(f"wrote the series as one patch to {args.single}")

        results: List[CheckResult] = []
        if args.apply:
            if series.docs_synthetic:
                log(f"not applying the {DOCS_PATH} hunks: this tree has no docs/")
            if args.check:
                # Pyro's tests are packages (a checkout has tests/__init__.py)
                for init in ("tests/__init__.py", "tests/infer/__init__.py"):
                    if not (tree / init).exists():
                        (tree / init).write_text(PYRO_HEADER)
            for patch in series.patches:
                apply_patch(tree, output / patch.name, patch, series.docs_synthetic)
                log(f"applied {patch.name}")
                if args.check:
                    result = check_patch(tree, patch, ruff, not args.full, args.without_funsor)
                    results.append(result)
                    log(report_line(result))
        if results:
            print("\nUpstream series, applied patch by patch to " + source_note + ":")
            for result in results:
                print(report_line(result))
            failed = [r for r in results if r.problems]
            for result in failed:
                print(f"\n{result.patch.name}:")
                for problem in result.problems:
                    print(textwrap.indent(problem, "    "))
            if failed:
                raise UpstreamError(f"{len(failed)} of {len(results)} patches failed the check")
        if args.workdir and args.pyro_source is None:
            log(f"kept the {'patched ' if args.apply else ''}tree in {tree}")
    log(f"done [{time.monotonic() - t_start:.1f} s]")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UpstreamError as error:
        print(f"make_upstream_series: error: {error}", file=sys.stderr)
        sys.exit(1)
