//! Where the core may run in parallel: the rayon pool's owner process and the
//! `Par` its kernels and faer's are given. A leaf: it uses nothing else from
//! the crate, so that every module can ask it.

/// Whether the rayon thread pool may be used from this process.
///
/// A process forked after the pool started (a PyTorch DataLoader worker, say)
/// inherits the pool's bookkeeping but not its threads: handing it work would
/// wait forever. The first call records the process id; a call from another
/// process (a fork child) gets `false`, and the core then runs sequentially.
/// Sequential and parallel runs give bit-identical results (see `factors`).
pub fn parallel_ok() -> bool {
    use std::sync::OnceLock;
    static OWNER: OnceLock<u32> = OnceLock::new();
    *OWNER.get_or_init(std::process::id) == std::process::id()
}

/// faer's high-level decompositions (Cholesky, symmetric eigen, SVD) use a
/// global parallelism setting; the core sets it to sequential once, so that
/// they are deterministic and never enter the pool from a fork child. The
/// core passes `Par` explicitly where it wants parallel kernels.
pub fn init_parallelism() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| faer::set_global_parallelism(faer::Par::Seq));
}

/// Whether the core's own kernels run on the pool with `par`: `Par::Rayon`,
/// in the process that owns the pool. Their results never depend on it.
pub fn pooled(par: faer::Par) -> bool {
    matches!(par, faer::Par::Rayon(_)) && parallel_ok()
}

/// The parallelism the core's own kernels are given: `Par::Rayon` in the
/// process that owns the pool, `Par::Seq` in a fork child. The kernels split
/// work by fixed partitions and never read the count in `Par::Rayon`; asking
/// rayon for it (`Par::rayon(0)`) would start the pool before a kernel needs
/// it. Not for faer's kernels: those take [`default_par`].
pub fn kernel_par() -> faer::Par {
    if parallel_ok() {
        faer::Par::Rayon(std::num::NonZeroUsize::MIN)
    } else {
        faer::Par::Seq
    }
}

/// `Par::rayon(0)` in the process that owns the pool, `Par::Seq` in a fork child.
pub fn default_par() -> faer::Par {
    if parallel_ok() {
        faer::Par::rayon(0)
    } else {
        faer::Par::Seq
    }
}
