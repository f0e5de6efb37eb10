#!/usr/bin/env bash
# The Terraform checks of the test command, all offline: formatting, the
# README tables, `terraform validate` of every module and example, and
# their `terraform test` files (a mocked AWS provider: no account, no
# network). Without `terraform` on the machine it says so in one line and
# passes. The AWS provider comes from a local mirror when the machine has
# one (TIERCAST_TF_MIRROR, default /opt/tf-plugins), else from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v terraform >/dev/null; then
  echo "terraform is not installed: the Terraform checks were skipped"
  exit 0
fi

mirror="${TIERCAST_TF_MIRROR:-/opt/tf-plugins}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -d "$mirror/registry.terraform.io/hashicorp/aws" ]; then
  cat > "$work/terraformrc" <<RC
provider_installation {
  filesystem_mirror {
    path    = "$mirror"
    include = ["registry.terraform.io/hashicorp/aws"]
  }
  direct {
    exclude = ["registry.terraform.io/hashicorp/aws"]
  }
}
RC
  export TF_CLI_CONFIG_FILE="$work/terraformrc"
fi
export TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1

echo "== terraform fmt"
terraform fmt -check -recursive terraform
echo "== module READMEs"
python3 scripts/terraform-docs.py --check
for dir in terraform/modules/* terraform/examples/*; do
  echo "== $dir: validate and test"
  # A copy, so that no .terraform or lock file is left in the tree.
  rm -rf "$work/tree" && cp -r terraform "$work/tree"
  (
    cd "$work/tree/${dir#terraform/}"
    terraform init -backend=false -no-color >/dev/null
    terraform validate -no-color
    if compgen -G "tests/*.tftest.hcl" >/dev/null; then
      terraform test -no-color
    fi
  )
done
