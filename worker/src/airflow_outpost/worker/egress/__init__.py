"""What leaves the region, and the proof of it.

* :mod:`.gateway`: ``Egress``, the one local chokepoint between task processes and the control plane
  (a loopback HTTP gateway in front of the Task Execution API).
* :mod:`.admission`: what the gateway forwards at all (Execution API paths, tokens of running tries).
* :mod:`.upstream`: forwarding to the control plane and streaming the answer back.
* :mod:`.policy`: the egress policy, decided per request.
* :mod:`.ledger`: the append-only, hash-chained ledger of what left.
* :mod:`.outage`: holding task requests through a control-plane outage.
* :mod:`.redact`: the size-capped, secret-masked log copy for ``logs = "redacted"``.
* :mod:`.xcom_backend`: region-local XCom (large or data-typed values stay, a reference leaves).
"""
