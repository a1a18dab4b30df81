"""Paillier rounds (secure_aggregation = "paillier"): devices encrypt their packed, quantized deltas
under the key holder's public key; the server keeps one running encrypted sum and has the separate key
holder (python -m server.keyholder) decrypt only that sum.

    protocol.py         pure: packing, the task, header checks, the key holder's messages, the sum
    store.py            the paillier_rounds table
    keyholder_client.py the server's client of the key holder (public key, decryption)
    keyholder_core.py   the key holder's own logic (key pair, guarded decryption, its log)
    service.py          PaillierService: inputs into the durable encrypted sum, the decrypted result
    routes.py           the HTTP routes
"""
from server.paillier.service import PaillierService

__all__ = ["PaillierService"]
