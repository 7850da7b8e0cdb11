"""Choosing a launcher and an address: what the Engine refuses before anything starts, how an
address naming an interface or a wildcard is bound and advertised, and where `energon worker`
finds its rank."""

from __future__ import annotations

import argparse
import socket

import pytest

from energon import EnergonError, Engine, InvalidRequest
from energon.actors import launch
from energon.launchers.address import interface_ipv4, interface_of, resolve
from energon.launchers.cluster_runner import toward_controller
from energon.launchers.rendezvous import reaching_interface


def test_an_unknown_launcher_is_refused():
    with pytest.raises(InvalidRequest, match="'local', 'external' or 'ray'") as info:
        Engine("tiny", launcher="slurm")
    assert info.value.field == "launcher"


@pytest.mark.parametrize(
    "address", [None, "tcp://10.0.0.1:0", "tcp://10.0.0.1", "ipc:///tmp/x", "10.0.0.1:5555"]
)
def test_the_external_launcher_needs_the_tcp_address_with_the_port_its_workers_were_given(
    address,
):
    with pytest.raises(InvalidRequest) as info:
        Engine("tiny", launcher="external", address=address)
    assert info.value.field == "address"
    assert "tcp://HOST:PORT" in str(info.value)


async def test_an_address_already_taken_fails_the_start_saying_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        engine = Engine("tiny", launcher="external", address=address, progress=False)
        with pytest.raises(
            EnergonError, match=f"cannot listen on {address} \\(Address already in use"
        ):
            await engine.start()


def test_an_address_may_name_an_interface():
    where = resolve("address", "tcp://lo:5555")
    assert (where.bind, where.advertised) == ("tcp://127.0.0.1:5555",) * 2


def test_a_wildcard_binds_every_interface_and_advertises_one_of_this_hosts_addresses():
    where = resolve("address", "tcp://*:0")
    assert where.bind == "tcp://0.0.0.0:0"
    assert where.advertised_host == "127.0.0.1" or interface_of(where.advertised_host)


def test_a_worker_reaches_a_controller_on_this_host_through_loopback():
    assert interface_ipv4("lo") == "127.0.0.1"
    assert reaching_interface("127.0.0.1") == "lo"


def test_a_worker_reaches_the_controllers_ports_through_the_host_it_dialed():
    dialed = {"ENERGON_CONTROLLER": "tcp://head-node:29500"}
    assert toward_controller("tcp://10.1.1.1:4444", dialed) == "tcp://head-node:4444"
    assert toward_controller("tcp://10.1.1.1:4444", {}) == "tcp://10.1.1.1:4444"


def test_the_rank_comes_from_torchrun_then_srun_then_mpirun_then_kubernetes():
    assert launch.launcher_rank({"RANK": "2", "SLURM_PROCID": "5"}) == (2, "RANK")
    assert launch.launcher_rank({"SLURM_PROCID": "5"}) == (5, "SLURM_PROCID")
    assert launch.launcher_rank({"OMPI_COMM_WORLD_RANK": "1"}) == (1, "OMPI_COMM_WORLD_RANK")
    assert launch.launcher_rank({"JOB_COMPLETION_INDEX": "7"}) == (7, "JOB_COMPLETION_INDEX")
    assert launch.launcher_rank({}) is None
    assert launch.launcher_world_size({"SLURM_NTASKS": "8"}) == (8, "SLURM_NTASKS")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        launch.launcher_rank({"RANK": "first"})


def test_a_worker_without_a_rank_says_where_to_give_one(monkeypatch, capsys):
    for name in launch.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    args = parser.parse_args(["--controller", "tcp://127.0.0.1:1"])
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert "give --rank" in err and "RANK, SLURM_PROCID" in err
