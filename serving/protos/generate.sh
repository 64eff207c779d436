#!/usr/bin/env bash
# Regenerates serving/esp_tfs_pb2.py (+ .pyi) from serving/protos/esp_tfs.proto.
#
# The generator is pinned: code from grpcio-tools N embeds its protoc's version and refuses to
# import on an older protobuf runtime. grpcio-tools 1.81.1 ships protoc 33.5, whose output needs
# protobuf >= 6.33.5 and < 7, which is what TensorFlow 2.21 and Beam 2.77 (protobuf < 7) both
# accept. The newest grpcio-tools generate code for protobuf 7, which Beam cannot install.
# Usage: serving/protos/generate.sh   (from anywhere; uses the active Python)
set -euo pipefail
PINNED_GRPCIO_TOOLS="1.81.1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(dirname "$here")"
have="$(python -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || echo none)"
if [[ "$have" != "$PINNED_GRPCIO_TOOLS" ]]; then
  echo "generate.sh: need grpcio-tools==$PINNED_GRPCIO_TOOLS, found $have (pip install grpcio-tools==$PINNED_GRPCIO_TOOLS)" >&2
  exit 1
fi
python -m grpc_tools.protoc -I "$here" --python_out="$out" --pyi_out="$out" "$here/esp_tfs.proto"
python -c "import sys; sys.path.insert(0, '$(dirname "$out")'); import serving.esp_tfs_pb2" 
echo "generated $out/esp_tfs_pb2.py"
