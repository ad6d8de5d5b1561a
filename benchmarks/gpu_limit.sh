# Sourced by gpu_check.sh and gpu_ddp_check.sh (after they set SCALE).
limit() {  # limit SECONDS COMMAND...: run it, at most SECONDS (x SCALE), and say how it ended
  local seconds=$(($1 * SCALE))
  shift
  timeout "$seconds" "$@"
  local rc=$?
  if [ "$rc" = 124 ]; then echo "   (stopped at its ${seconds}-s limit)"; elif [ "$rc" != 0 ]; then echo "   (exit $rc)"; fi
  return 0
}
