#!/bin/sh
# Create what an install needs besides `kubectl apply -k deploy/k8s` (README "Install"),
# in namespace $NAMESPACE (default syncbit):
#   Secrets syncbit-token (the cluster secret), syncbit-bootstrap, syncbit-reader and
#   syncbit-admin (credentials signed with it), syncbit-scheduler-tls and
#   syncbit-daemon-tls (certificates from a private CA), and ConfigMap syncbit-ca.
# Runs once per install; refuses to run if DIR already holds a CA.
#
#   deploy/k8s/make-secrets.sh [DIR]
#
# Needs kubectl and the syncbit CLI: $SYNCBIT, default `syncbit`; without a local install
# SYNCBIT="docker run --rm -v $PWD:$PWD -w $PWD ghcr.io/syncbit/syncbit:0.1.0" (DIR must
# then be below $PWD). DIR (default ./syncbit-ca) keeps only the CA afterwards: ca.crt,
# and ca.key to sign later certificates; move ca.key offline. The cluster secret and the
# credentials are written to DIR only while this runs, then removed; issue more later
# with `kubectl -n syncbit exec syncbit-scheduler-0 -- syncbit token create --role ...`.
set -eu
NAMESPACE=${NAMESPACE:-syncbit}
SYNCBIT=${SYNCBIT:-syncbit}
KUBECTL=${KUBECTL:-kubectl}
DIR=${1:-syncbit-ca}

if [ -e "$DIR/ca.crt" ]; then
  echo "error: $DIR/ca.crt exists: this install has its secrets already" >&2
  exit 2
fi
mkdir -p "$DIR"
umask 077
cleanup() { rm -f "$DIR/secret" "$DIR"/*.token "$DIR"/scheduler.* "$DIR"/daemon.*; }
trap cleanup EXIT

# The scheduler's certificate names the Service (clients), each replica below the headless
# Service syncbit-scheduler-replicas (daemons, and followers reaching the leader; set
# SCHEDULER_REPLICAS if you scale the StatefulSet) and loopback (`kubectl exec`).
set --
for name in syncbit-scheduler "syncbit-scheduler.$NAMESPACE" "syncbit-scheduler.$NAMESPACE.svc" \
  "syncbit-scheduler.$NAMESPACE.svc.cluster.local" localhost 127.0.0.1; do
  set -- "$@" --scheduler-name "$name"
done
i=0
while [ "$i" -lt "${SCHEDULER_REPLICAS:-3}" ]; do
  set -- "$@" --scheduler-name "syncbit-scheduler-$i.syncbit-scheduler-replicas.$NAMESPACE.svc"
  i=$((i + 1))
done
$SYNCBIT tls init "$DIR" "$@" >/dev/null
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/secret"
for role in bootstrap reader admin; do
  $SYNCBIT token create --role "$role" --secret-file "$DIR/secret" >"$DIR/$role.token"
done

$KUBECTL -n "$NAMESPACE" create secret generic syncbit-token --from-file=token="$DIR/secret"
for role in bootstrap reader admin; do
  $KUBECTL -n "$NAMESPACE" create secret generic "syncbit-$role" \
    --from-file=token="$DIR/$role.token"
done
for who in scheduler daemon; do
  $KUBECTL -n "$NAMESPACE" create secret generic "syncbit-$who-tls" \
    --from-file=tls.crt="$DIR/$who.crt" --from-file=tls.key="$DIR/$who.key" \
    --from-file=ca.crt="$DIR/ca.crt"
done
$KUBECTL -n "$NAMESPACE" create configmap syncbit-ca --from-file=ca.crt="$DIR/ca.crt"
echo "created the syncbit Secrets and ConfigMap syncbit-ca in $NAMESPACE; the CA is in $DIR" >&2
