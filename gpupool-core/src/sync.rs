//! Locking a [`std::sync::Mutex`] whose last holder panicked.
//!
//! Core, the worker and the AMQP backend guard short critical sections with
//! std mutexes and treat poisoning the same way, so the one function lives
//! here, in the crate they all depend on. Nothing queue-specific lives here.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking over a lock that a panicking holder left poisoned.
///
/// For data that stays consistent wherever a holder may panic (each
/// critical section writes at its end): the panic is that holder's failure,
/// reported where it happened, and need not make every later caller panic
/// too.
///
/// ```
/// use std::sync::Mutex;
/// use gpupool_core::sync::lock;
///
/// let m = Mutex::new(1);
/// let _ = std::panic::catch_unwind(|| {
///     let _guard = m.lock();
///     panic!("a holder panics");
/// });
/// assert!(m.is_poisoned());
/// *lock(&m) += 1;
/// assert_eq!(*lock(&m), 2);
/// ```
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
