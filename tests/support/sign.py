"""Signs test webhooks the way each provider does, with the providers' own libraries where they
publish one: Stripe (stripe), Resend (standardwebhooks, which Resend's SDK uses), SendGrid
(an EC P-256 key, as its signed Event Webhook), and Amazon SNS (an RSA key and a self-signed
certificate made here). The payload is read from stdin; the result is printed.

  sign.py stripe SECRET UNIX_TS
  sign.py standard SECRET MSG_ID UNIX_TS
  sign.py sendgrid-key KEY_FILE           (makes a key; prints the public key, base64 SPKI)
  sign.py sendgrid KEY_FILE UNIX_TS
  sign.py sns-cert DIR FILE_NAME          (makes DIR/FILE_NAME, a certificate, and its key)
  sign.py sns KEY_FILE                    (stdin: an SNS message without Signature; prints it signed)
"""

import base64
import datetime
import json
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

NOTIFICATION_FIELDS = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
CONFIRMATION_FIELDS = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]


def sns_string_to_sign(message):
    fields = NOTIFICATION_FIELDS if message["Type"] == "Notification" else CONFIRMATION_FIELDS
    return "".join(f"{name}\n{message[name]}\n" for name in fields if name in message)


def main(command, *args):
    payload = sys.stdin.read()
    if command == "stripe":
        import stripe

        secret, ts = args
        print(stripe.WebhookSignature.generate_signature_header(payload, secret, int(ts)))
    elif command == "standard":
        from standardwebhooks.webhooks import Webhook

        secret, msg_id, ts = args
        at = datetime.datetime.fromtimestamp(int(ts), tz=datetime.timezone.utc)
        print(Webhook(secret).sign(msg_id, at, payload))
    elif command == "sendgrid-key":
        (key_file,) = args
        key = ec.generate_private_key(ec.SECP256R1())
        with open(key_file, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        print(base64.b64encode(spki).decode())
    elif command == "sendgrid":
        key_file, ts = args
        with open(key_file, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        signature = key.sign(ts.encode() + payload.encode(), ec.ECDSA(hashes.SHA256()))
        print(base64.b64encode(signature).decode())
    elif command == "sns-cert":
        directory, name = args
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        with open(f"{directory}/{name}", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(f"{directory}/{name}.key", "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif command == "sns":
        (key_file,) = args
        with open(key_file, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        message = json.loads(payload)
        digest = hashes.SHA1() if message["SignatureVersion"] == "1" else hashes.SHA256()
        signature = key.sign(sns_string_to_sign(message).encode(), padding.PKCS1v15(), digest)
        message["Signature"] = base64.b64encode(signature).decode()
        print(json.dumps(message))
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main(*sys.argv[1:])
