"""Capacity and cost planning for a fleet before ``pulumi up`` (``iotctl capacity``, ``iotctl cost``).

- :mod:`iotbridge.planning.capacity`: how many broker hosts, Dataflow workers and Bigtable nodes a fleet needs, and
  how much BigQuery streams and stores, from the bench's per-host figures (``bench/reference/results.json``) and
  the stack's config (``Pulumi.<stack>.yaml``); broker hosts also by what one host of the stack's machine type
  carries (:mod:`iotbridge.planning.host_sizing`, the arithmetic the infrastructure library sizes its hosts with).
- :mod:`iotbridge.planning.cost`: the monthly list-price estimate of that capacity, per component, from the dated
  price table ``prices.json`` (or the Cloud Billing Catalog with ``--prices live``).

docs/capacity.md describes the model, every assumption and what is not counted.
"""
