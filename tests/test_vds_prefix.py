"""HDF5_VDS_PREFIX would make HDF5 read a sharded store's rows and labels from another folder than
the index records (and checks): such a store is refused while it is set, never read mixed."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from imagetree import make_tree

from streamnn import StreamnnError, open_store
from streamnn.cli.info import main as info_main
from streamnn.pack import pack
from streamnn.pack.sharded import pack_sharded


@pytest.fixture(scope="module")
def two_sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("vds")
    for name, seed in (("a", 1), ("b", 2)):
        make_tree(root / f"src-{name}", {"training_set": {"cats": 3, "dogs": 3}, "test_set": {"cats": 1, "dogs": 1}},
                  h=10, w=10, seed=seed)
        (root / name).mkdir()
        pack_sharded(root / f"src-{name}", root / name / "s.h5", shards=2, size=8, workers=1)
    return root


def test_a_sharded_store_is_refused_while_hdf5_vds_prefix_is_set(two_sharded, monkeypatch):
    a, b = two_sharded / "a" / "s.h5", two_sharded / "b" / "s.h5"
    with open_store(a) as s:
        labels = s.labels("train")
    monkeypatch.setenv("HDF5_VDS_PREFIX", str(b.parent))
    with pytest.raises(StreamnnError, match="HDF5_VDS_PREFIX is set") as err:
        open_store(a)
    assert "\n" not in str(err.value) and str(a) in str(err.value)
    result = CliRunner().invoke(info_main, [str(a)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "HDF5_VDS_PREFIX" in result.output
    monkeypatch.delenv("HDF5_VDS_PREFIX")
    with open_store(a) as s:
        assert (s.labels("train") == labels).all()


def test_a_one_file_store_does_not_care(two_sharded, tmp_path, monkeypatch):
    pack(two_sharded / "src-a", tmp_path / "one.h5", size=8, workers=1)
    monkeypatch.setenv("HDF5_VDS_PREFIX", str(tmp_path))
    with open_store(tmp_path / "one.h5") as s:
        assert s.n_rows("train") == 6
