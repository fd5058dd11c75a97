# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Statistical-dependence tracking of sampled values through arbitrary torch code.

A :class:`DependencyTracker` records, for every tensor computed while it is
active, the set of sample sites whose *values* that tensor may depend on (its
*provenance*). It works at the level of PyTorch's dispatcher
(:class:`~torch.utils._python_dispatch.TorchDispatchMode`), so it sees every
ATen operation that runs, whatever Python or C++ code issued it: ``nn.GRU`` and
packed sequences, ``einsum``, ``gather``, ``torch.where`` and comparisons,
``.detach()`` and ``torch.no_grad`` regions alike. The result is therefore the
same with and without autograd enabled. Rules:

* an operation's tensor outputs depend on the union of its tensor inputs
  (value-independent factories such as ``zeros_like`` excepted);
* an operation that writes into an argument (``copy_``, ``index_put_``,
  ``buf[:, t] = z``, ``out=``) adds its inputs' provenance to the written
  tensor's whole *storage*, so every view or alias of that buffer read later
  carries it (an over-approximation, which is the safe direction);
* a sampled value is tagged with its own site only, so a site's parents are
  the sites that flow into its distribution directly, and ancestry is the
  transitive closure; the tag goes to the value and to what is computed from
  it, views included, not to aliases of its storage that existed before (the
  values it was made from, such as an autoguide's joint latent);
* a value that leaves the tensor world (``.item()``, ``bool()``, ``.tolist()``,
  ``.numpy()``) can steer Python control flow, which no tracker can follow.
  Such an *escape* is recorded, and every site sampled after it is treated as
  depending on every site sampled before it.

Pyro's :mod:`pyro.ops.provenance` tracks provenance with a tensor subclass and
loses in-place writes into plain buffers; autograd-graph reachability misses
``where``/comparison/``detach`` paths and sees nothing under ``torch.no_grad``.
Dispatcher-level tracking has neither blind spot.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import types
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import pyro
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations whose outputs do not depend on the *values* of their inputs.
_VALUE_INDEPENDENT = frozenset(
    {
        aten.zeros_like,
        aten.ones_like,
        aten.empty_like,
        aten.full_like,
        aten.rand_like,
        aten.randn_like,
        aten.randint_like,
        aten.new_zeros,
        aten.new_ones,
        aten.new_empty,
        aten.new_full,
        aten.new_empty_strided,
    }
)

# Operations that return metadata rather than values.
_METADATA = frozenset(
    {
        aten.size,
        aten.sym_size,
        aten.stride,
        aten.sym_stride,
        aten.numel,
        aten.sym_numel,
        aten.dim,
        aten.is_contiguous,
        aten.is_same_size,
        aten.is_complex,
        aten.is_floating_point,
    }
)

# Tensor methods that hand a tensor's values to Python without an ATen op.
_ESCAPING_METHODS = frozenset(
    {
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.__array__,
        torch.Tensor.data_ptr,
        torch.Tensor.__dlpack__,
    }
)


def _leaves(xs: Any) -> List[Any]:
    """The leaves of nested lists, tuples and dict values (a fast ``tree_flatten``)."""
    result: List[Any] = []
    stack = list(xs)
    while stack:
        x = stack.pop()
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        else:
            result.append(x)
    return result


def _tensors(xs: Any) -> List[torch.Tensor]:
    return [x for x in _leaves(xs) if isinstance(x, torch.Tensor)]


@functools.lru_cache(maxsize=None)  # noqa: UP033 -- Python 3.8, as Pyro
def _written_arguments(func: Any) -> Tuple[Tuple[int, str], ...]:
    """Positions and names of the arguments an operator writes into."""
    return tuple(
        (i, arg.name)
        for i, arg in enumerate(func._schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    )


# the directories of torch, pyro and this package (this module's own: importing the package
# root from here would import the ELBOs, which import this module)
_SKIP_FRAMES = tuple(
    os.path.dirname(path) + os.sep for path in (torch.__file__, pyro.__file__, __file__) if path
)


def _user_location() -> str:
    """The innermost stack frame outside torch, pyro and this package."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_SKIP_FRAMES) and "<frozen" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "<unknown>"


class DependencyTracker:
    """
    Provenance bookkeeping shared by the dispatch- and function-level modes.

    Provenance is stored as a Python ``int`` used as a bit set over the sites
    registered with :meth:`tag` (bit ``i`` is the ``i``-th site tagged), so a
    union is one ``|``. Tensors are held by weak reference (a recycled id is
    detected by the dead reference), storages written into by strong
    reference (few, and their ids must stay unique while the tracker is used).

    Use as a context manager::

        tracker = DependencyTracker()
        with tracker:
            ...  # run the program
    """

    def __init__(self) -> None:
        self.names: List[str] = []
        self._index: Dict[str, int] = {}
        self._run_sites: int = 0
        self._tensor_prov: Dict[int, Tuple[weakref.ref, int]] = {}
        self._storage_prov: Dict[int, Tuple[Any, int]] = {}
        # the memory of tagged values, for tensors made over it outside the dispatcher
        self._value_memory: Dict[int, Tuple[Any, int]] = {}
        #: bit set of the sites whose values escaped into Python so far
        self.escaped: int = 0
        #: where each escape happened, as ``(site names, "file:line")``
        self.escapes: List[Tuple[Tuple[str, ...], str]] = []
        self._modes: Optional[Tuple[TorchFunctionMode, TorchDispatchMode]] = None

    # --- provenance of tensors -------------------------------------------------
    @staticmethod
    def _storage_key(tensor: torch.Tensor) -> Optional[Tuple[int, Any]]:
        # keyed by the memory address, not the storage object: torch.from_numpy and
        # torch.from_dlpack make new storage objects for memory that a tracked tensor wrote
        # to; the strong reference kept with the entry keeps the address unique
        try:
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        if not address:
            return None  # empty, or no memory (meta tensors)
        return address, storage

    def provenance(self, tensor: torch.Tensor) -> int:
        """The bit set of sites ``tensor`` may depend on."""
        entry = self._tensor_prov.get(id(tensor))
        known = entry is not None and entry[0]() is tensor
        bits = entry[1] if known else 0
        if self._storage_prov or (self._value_memory and not known):
            key = self._storage_key(tensor)
            if key is not None:
                sentry = self._storage_prov.get(key[0])
                if sentry is not None:
                    bits |= sentry[1]
                if not known:
                    # a new storage, made outside torch's aliasing, over a sampled value's
                    # memory: torch.utils.dlpack.from_dlpack(to_dlpack(z)), from_numpy;
                    # other aliases of the same storage (a replayed autoguide site's value
                    # is a view of the joint latent, as is its neighbour's) hold the values
                    # the site was made from
                    ventry = self._value_memory.get(key[0])
                    if ventry is not None and ventry[0]._cdata != key[1]._cdata:
                        bits |= ventry[1]
        return bits

    def _set(self, tensor: torch.Tensor, bits: int) -> None:
        # a weak reference: the analysis must not keep every intermediate alive; a dead
        # entry whose id is reused by a new tensor is recognised and ignored
        self._tensor_prov[id(tensor)] = (weakref.ref(tensor), bits)

    def _taint_storage(self, tensor: torch.Tensor, bits: int) -> None:
        key = self._storage_key(tensor)
        if key is not None:
            old = self._storage_prov.get(key[0])
            self._storage_prov[key[0]] = (key[1], bits | (old[1] if old else 0))
            if not key[1].resizable():
                # memory torch does not own (numpy, dlpack, shared memory, a file): other
                # code may read the values from there without a torch operation
                self._escape(bits)

    def provenance_of(self, obj: Any) -> int:
        """Union of the provenance of every tensor reachable from ``obj``."""
        bits = 0
        for tensor in reachable_tensors(obj):
            bits |= self.provenance(tensor)
        return bits

    def tag(self, tensor: torch.Tensor, name: str, keep: int = 0) -> int:
        """
        Register a new sample site and make ``tensor``, and every tensor
        computed from it later (views included), depend on it, and on the sites
        in ``keep`` besides.

        The site's bit is not given to ``tensor``'s storage: other aliases of
        that storage that exist already hold the values ``tensor`` was made
        from, not values made from it (the sites of an autoguide are views of
        its joint latent, and one site's bit on the latent's storage would make
        every later site depend on it). A later write into ``tensor`` or one of
        its views taints the storage with the site, as every write does. Only a
        tensor that no operation made (``torch.from_numpy``, a dlpack capsule's
        tensor) over the value's memory inherits the site from the memory.

        :param keep: the bit set of sites the value itself was computed from
            and keeps depending on (for a value recorded at a site rather than
            drawn from its distribution)
        :returns: the site's bit
        """
        index = self._index.get(name)
        if index is None:  # a site of the same name in another run is the same site
            index = self._index[name] = len(self.names)
            self.names.append(name)
        bit = 1 << index
        self._run_sites |= bit
        self._set(tensor, bit | keep)
        key = self._storage_key(tensor)
        if key is not None:
            old = self._value_memory.get(key[0])
            self._value_memory[key[0]] = (key[1], bit | keep | (old[1] if old else 0))
        return bit

    def bit_of(self, name: str) -> int:
        """The bit of the site ``name``, ``0`` if it was not tagged."""
        index = self._index.get(name)
        return 0 if index is None else 1 << index

    def all_sites(self) -> int:
        """Bit set of every site tagged so far in this run (see :meth:`new_run`)."""
        return self._run_sites

    def new_run(self) -> None:
        """
        Start the run of another program (the model after the guide) with this
        tracker: tensors keep their provenance, so what the first program left
        for the second to read carries its sites, and a site of the same name
        gets the same bit; escapes and :meth:`all_sites` start afresh.
        """
        self._run_sites = 0
        self.escaped = 0
        self.escapes = []

    def names_of(self, bits: int) -> frozenset:
        """Decode a bit set into a frozenset of site names."""
        return frozenset(name for i, name in enumerate(self.names) if bits >> i & 1)

    def _escape(self, bits: int) -> None:
        if bits:
            self.escaped |= bits
            self.escapes.append((tuple(sorted(self.names_of(bits))), _user_location()))

    # --- the modes -----------------------------------------------------------------
    def _on_dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in _METADATA or packet in _VALUE_INDEPENDENT:
            return out
        bits = 0
        for t in _tensors(args):
            bits |= self.provenance(t)
        if kwargs:
            for t in _tensors(kwargs.values()):
                bits |= self.provenance(t)
        if not bits:
            return out
        for i, arg_name in _written_arguments(func):
            value = args[i] if i < len(args) else kwargs.get(arg_name)
            for t in _tensors((value,)):
                self._taint_storage(t, bits)
        if isinstance(out, torch.Tensor):
            self._set(out, bits)
            return out
        escaped = False
        for o in _leaves((out,)):
            if isinstance(o, torch.Tensor):
                self._set(o, bits)
            elif isinstance(o, (bool, int, float, complex)):
                escaped = True
        if escaped:
            self._escape(bits)
        return out

    def _on_function(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if func in _ESCAPING_METHODS and args and isinstance(args[0], torch.Tensor):
            self._escape(self.provenance(args[0]))
        out = func(*args, **kwargs)
        if func is torch.Tensor.__deepcopy__ and isinstance(out, torch.Tensor):
            self._set(out, self.provenance(args[0]))
        return out

    def __enter__(self) -> DependencyTracker:
        tracker = self

        class _FunctionMode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return tracker._on_function(func, args, kwargs or {})

        class _DispatchMode(TorchDispatchMode):
            @classmethod
            def _should_skip_dynamo(cls) -> bool:
                # torch wraps a mode's __torch_dispatch__ so that torch.compile does not trace
                # it; the wrapper imports torch._dynamo on first use (about 1.2 s per process)
                # and costs a little on every operation. Without torch._dynamo loaded nothing
                # in this process compiles with torch.compile, and the wrapper is not needed.
                return "torch._dynamo" in sys.modules

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return tracker._on_dispatch(func, args, kwargs or {})

        self._modes = (_FunctionMode(), _DispatchMode())
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._modes is not None
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = None


_MAX_OBJECTS = 10000


def reachable_tensors(obj: Any) -> List[torch.Tensor]:
    """
    Every tensor reachable from ``obj`` through attributes, containers,
    ``functools.partial`` objects, closures and bound methods: the parameters of
    a distribution, of its base distributions and of its transforms (including
    tensors a conditional transform captured in a closure).

    :raises RecursionError: if the object graph is too large to search; the
        caller must then treat the dependencies as unknown.
    """
    found: List[torch.Tensor] = []
    seen: set = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
            continue
        if x is None or isinstance(x, (str, bytes, int, float, bool, complex, type)):
            continue
        if isinstance(x, (types.ModuleType, torch.dtype, torch.device, torch.Size)):
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        if len(seen) > _MAX_OBJECTS:
            raise RecursionError("object graph too large to search for tensors")
        if isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, functools.partial):
            stack.extend((x.func, x.args, x.keywords))
        elif isinstance(x, types.MethodType):
            stack.extend((x.__self__, x.__func__))
        elif isinstance(x, types.FunctionType):
            if x.__closure__:
                for cell in x.__closure__:
                    try:
                        stack.append(cell.cell_contents)
                    except ValueError:  # empty cell
                        pass
            stack.extend((x.__defaults__, x.__kwdefaults__))
        else:
            if hasattr(x, "__dict__"):
                stack.append(vars(x))
            for slot in getattr(type(x), "__slots__", ()):
                stack.append(getattr(x, slot, None))
    return found
