//! When the sampler captures a denoising step as a device graph and when it
//! replays one (host logic only; the capture itself is the backend's
//! [`StepGraphSession`](crate::backend::StepGraphSession)).
//!
//! Steps are grouped by the graph key their hooks give
//! ([`ForwardHooks::graph_key`](crate::model::stdit3::ForwardHooks::graph_key)):
//! steps with the same key run the same ops on the same shapes. A step without
//! a key runs eagerly. For a key, the first step runs eagerly with its inputs
//! bound (the warm-up: caches filled, weights uploaded), the second is
//! captured, and later ones replay that graph. One graph is kept: a step of
//! another key that gets captured replaces it, and a graph the session refuses
//! to replay (its memory changed) is captured again. The last step is not
//! captured (no replay could follow). After a failed capture, every later step
//! of the run is eager.

/// How the sampler runs one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// Plain eager execution (no session involved).
    Eager,
    /// Eager, with the step inputs bound to the session's buffers.
    WarmUp,
    Capture,
    Replay,
}

/// The decisions of one sampling run; see the module notes.
#[derive(Debug, Default)]
pub struct GraphPlanner {
    warm: Vec<u64>,
    captured: Option<u64>,
    disabled: bool,
}

impl GraphPlanner {
    /// The mode of a computing step with graph key `key`, `steps_left` steps before the end of the run.
    pub fn mode(&self, key: Option<u64>, steps_left: usize) -> StepMode {
        let Some(k) = key else { return StepMode::Eager };
        if self.disabled {
            StepMode::Eager
        } else if self.captured == Some(k) {
            StepMode::Replay
        } else if self.warm.contains(&k) && steps_left > 0 {
            StepMode::Capture
        } else {
            StepMode::WarmUp
        }
    }

    /// True while graphs may still be used in this run.
    pub fn active(&self) -> bool {
        !self.disabled
    }

    /// A step of `key` ran in `mode` (a capture that succeeded).
    pub fn ran(&mut self, key: u64, mode: StepMode) {
        match mode {
            StepMode::WarmUp => {
                if !self.warm.contains(&key) {
                    self.warm.push(key);
                }
            }
            StepMode::Capture => self.captured = Some(key),
            StepMode::Eager | StepMode::Replay => {}
        }
    }

    /// The session refused to replay the graph: capture it again.
    pub fn replay_refused(&mut self) {
        self.captured = None;
    }

    /// A capture failed: no graphs for the rest of the run.
    pub fn capture_failed(&mut self) {
        self.disabled = true;
        self.captured = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `keys` (one per computing step) through the planner, with the session
    /// refusing the replays at the steps in `refuse` and failing the captures in `fail`.
    fn modes(keys: &[Option<u64>], refuse: &[usize], fail: &[usize]) -> Vec<StepMode> {
        let mut p = GraphPlanner::default();
        let n = keys.len();
        let mut out = Vec::new();
        for (i, &key) in keys.iter().enumerate() {
            let mut mode = p.mode(key, n - 1 - i);
            if mode == StepMode::Replay && refuse.contains(&i) {
                p.replay_refused();
                mode = p.mode(key, n - 1 - i);
            }
            if mode == StepMode::Capture && fail.contains(&i) {
                p.capture_failed();
                mode = StepMode::Eager;
            }
            if let Some(k) = key {
                p.ran(k, mode);
            }
            out.push(mode);
        }
        out
    }

    use StepMode::*;

    #[test]
    fn warm_up_then_capture_then_replay() {
        assert_eq!(modes(&[Some(0); 5], &[], &[]), vec![WarmUp, Capture, Replay, Replay, Replay]);
        // Too short to replay: nothing is captured.
        assert_eq!(modes(&[Some(0); 1], &[], &[]), vec![WarmUp]);
        assert_eq!(modes(&[Some(0); 2], &[], &[]), vec![WarmUp, WarmUp]);
        assert_eq!(modes(&[Some(0); 3], &[], &[]), vec![WarmUp, Capture, Replay]);
    }

    #[test]
    fn steps_without_a_key_run_eagerly_and_keep_the_graph() {
        let keys = [Some(0), None, Some(0), None, Some(0)];
        assert_eq!(modes(&keys, &[], &[]), vec![WarmUp, Eager, Capture, Eager, Replay]);
    }

    #[test]
    fn a_new_structure_is_warmed_up_and_captured_separately() {
        let keys = [Some(1), Some(1), Some(1), Some(2), Some(2), Some(2), Some(1), Some(1)];
        assert_eq!(modes(&keys, &[], &[]), vec![WarmUp, Capture, Replay, WarmUp, Capture, Replay, Capture, Replay]);
    }

    #[test]
    fn a_refused_replay_captures_again() {
        assert_eq!(modes(&[Some(0); 5], &[3], &[]), vec![WarmUp, Capture, Replay, Capture, Replay]);
        // On the last step a refused replay runs warm (eagerly) instead.
        assert_eq!(modes(&[Some(0); 4], &[3], &[]), vec![WarmUp, Capture, Replay, WarmUp]);
    }

    #[test]
    fn a_failed_capture_turns_graphs_off_for_the_run() {
        assert_eq!(modes(&[Some(0); 5], &[], &[1]), vec![WarmUp, Eager, Eager, Eager, Eager]);
        let mut p = GraphPlanner::default();
        p.capture_failed();
        assert!(!p.active());
        assert_eq!(p.mode(Some(0), 10), Eager);
    }
}
