//! Operator syntax: `a + b`, `a - b`, `a * b`, `a / b` (elementwise, broadcasting), `-a`, and
//! the same with a scalar on either side. Binary operators between `Var`s panic with the
//! error's message (expected vs got) on incompatible shapes, naming the caller's line; use
//! `try_add` and friends in library code.

use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::{Element, Result, Var};

#[track_caller]
fn or_panic<'t, T: Element>(result: Result<Var<'t, T>>) -> Var<'t, T> {
    match result {
        Ok(var) => var,
        Err(error) => panic!("{error}"),
    }
}

macro_rules! var_var_operator {
    ($trait:ident, $method:ident, $try:ident) => {
        impl<'t, T: Element> $trait<Var<'t, T>> for Var<'t, T> {
            type Output = Var<'t, T>;
            /// # Panics
            /// If the shapes do not broadcast or the operands are on different tapes.
            #[track_caller]
            fn $method(self, rhs: Var<'t, T>) -> Var<'t, T> {
                or_panic(self.$try(rhs))
            }
        }
    };
}

var_var_operator!(Add, add, try_add);
var_var_operator!(Sub, sub, try_sub);
var_var_operator!(Mul, mul, try_mul);
var_var_operator!(Div, div, try_div);

impl<'t, T: Element> Neg for Var<'t, T> {
    type Output = Var<'t, T>;
    fn neg(self) -> Var<'t, T> {
        self.negate()
    }
}

impl<'t, T: Element> Add<T> for Var<'t, T> {
    type Output = Var<'t, T>;
    fn add(self, c: T) -> Var<'t, T> {
        self.add_scalar(c)
    }
}

impl<'t, T: Element> Sub<T> for Var<'t, T> {
    type Output = Var<'t, T>;
    fn sub(self, c: T) -> Var<'t, T> {
        self.add_scalar(-c)
    }
}

impl<'t, T: Element> Mul<T> for Var<'t, T> {
    type Output = Var<'t, T>;
    fn mul(self, c: T) -> Var<'t, T> {
        self.mul_scalar(c)
    }
}

impl<'t, T: Element> Div<T> for Var<'t, T> {
    type Output = Var<'t, T>;
    fn div(self, c: T) -> Var<'t, T> {
        self.div_scalar(c)
    }
}

// A scalar on the left: written per type because Rust cannot implement `Add<Var<T>>` for a
// generic `T` it does not own.
macro_rules! scalar_lhs_operators {
    ($($t:ty),*) => {$(
        impl<'t> Add<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn add(self, x: Var<'t, $t>) -> Var<'t, $t> {
                x.add_scalar(self)
            }
        }
        impl<'t> Sub<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn sub(self, x: Var<'t, $t>) -> Var<'t, $t> {
                x.negate().add_scalar(self)
            }
        }
        impl<'t> Mul<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn mul(self, x: Var<'t, $t>) -> Var<'t, $t> {
                x.mul_scalar(self)
            }
        }
        impl<'t> Div<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn div(self, x: Var<'t, $t>) -> Var<'t, $t> {
                x.scalar_div(self)
            }
        }
    )*};
}

scalar_lhs_operators!(f32, f64);
