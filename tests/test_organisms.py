"""Model organisms: the numpy random init matches create_model's."""

import jax
import numpy as np
from flax import nnx

from opd_jax import organisms
from opd_jax.models import create_model


def _flat(model) -> dict:
  pure = nnx.to_pure_dict(nnx.state(model))
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]
  }


def test_numpy_init_matches_create_model():
  """Same parameters (paths, shapes, dtypes) as create_model's init; norm
  scales 1, the rest N(0, 0.02^2); a seed gives the same draw, another a
  different one."""
  cfg = organisms.Arch(num_layers=2, hidden_size=64).model_config(40, 1, 0)
  got, want = _flat(organisms.numpy_init_model(cfg, 3)), _flat(create_model(cfg, seed=3))
  assert got.keys() == want.keys()
  for key, x in got.items():
    assert (x.shape, x.dtype) == (want[key].shape, want[key].dtype), key
    if np.all(want[key] == 1.0):
      np.testing.assert_array_equal(x, 1.0, err_msg=key)
    else:
      assert x.size >= 64 and abs(x.std() - 0.02) < 0.004 and abs(x.mean()) < 0.004, key
  again, other = (
    _flat(organisms.numpy_init_model(cfg, 3)),
    _flat(organisms.numpy_init_model(cfg, 4)),
  )
  assert all(np.array_equal(again[k], got[k]) for k in got)
  assert not np.array_equal(other["['embed']"], got["['embed']"])
