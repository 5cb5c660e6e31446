"""IoT Core's device manager API (``cloudiot.googleapis.com/v1``) over our registry (docs/admin-api.md).

``create_app`` (:mod:`iotbridge.admin.app`) builds the WSGI app from the registry access, a Pub/Sub publisher and
an ``authorize`` hook; ``python -m iotbridge.admin`` serves it.
"""
